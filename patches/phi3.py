"""Phi-3 (`model_type: phi3`, fused qkv_proj and gate_up_proj): transformers' own modeling code."""

from .native_rules import native_pack

PACK = native_pack("phi3", family="phi3", model_types=("phi3",), architecture="Phi3ForCausalLM",
                   summary="Phi-3 mini/medium with fused qkv_proj (transformers modeling_phi3)")
