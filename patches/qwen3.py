"""Qwen3 dense models (`model_type: qwen3`, q_norm/k_norm): transformers' own modeling code."""

from .native_rules import native_pack

PACK = native_pack("qwen3", family="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM",
                   summary="Qwen3 dense models with q_norm/k_norm (transformers modeling_qwen3)")
