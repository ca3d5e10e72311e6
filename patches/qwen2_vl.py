"""Qwen2-VL (`model_type: qwen2_vl`): transformers' own modeling code, text decoder and vision tower.

The native patches fit both halves: the decoder's cache becomes history K/V in and this step's K/V out, and
`eager-attention` also makes the vision attention eager (its SDPA/flash dispatch does not export). The export
spec (export/vl_arch.py) says where the language model sits and that its positions have three components.
"""

from surgery.export.vl_arch import QWEN2_VL_SPEC

from .native_rules import native_pack

PACK = native_pack("qwen2_vl", family="qwen2_vl", model_types=("qwen2_vl",),
                   architecture="Qwen2VLForConditionalGeneration", export_spec=QWEN2_VL_SPEC,
                   summary="Qwen2-VL (transformers modeling_qwen2_vl): vision graph + multimodal-RoPE decoder")
