"""Olmo2 (`model_type: olmo2`): transformers' own modeling code.

Scaffolded by `surgery port olmo2 --like llama`; see docs/porting.md for what to check next.
"""

from surgery.patches.native_rules import native_pack

PACK = native_pack("olmo2", family="olmo2", model_types=("olmo2",), architecture="Olmo2ForCausalLM",
                   summary="Olmo2 (transformers modeling_olmo2)")
