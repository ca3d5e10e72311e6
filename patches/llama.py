"""Llama 2/3/3.2, TinyLlama, SmolLM, OpenBuddy (`model_type: llama`): transformers' own modeling code."""

from .native_rules import native_pack

PACK = native_pack("llama", family="llama", model_types=("llama",), architecture="LlamaForCausalLM",
                   summary="Llama 2/3/3.2, TinyLlama, SmolLM, OpenBuddy (transformers modeling_llama)")
