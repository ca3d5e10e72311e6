"""Qwen1.5 / Qwen2 / Qwen2.5 (`model_type: qwen2`): transformers' own modeling code."""

from .native_rules import native_pack

PACK = native_pack("qwen2", family="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
                   summary="Qwen1.5, Qwen2, Qwen2.5 (transformers modeling_qwen2)")
