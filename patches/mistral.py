"""Mistral (`model_type: mistral`): transformers' own modeling code.

With the mask given as an input, the sliding window is the runtime's mask to apply; within one
static length up to `sliding_window` tokens the two are the same.
"""

from .native_rules import native_pack

PACK = native_pack("mistral", family="mistral", model_types=("mistral",), architecture="MistralForCausalLM",
                   summary="Mistral 7B family (transformers modeling_mistral)")
