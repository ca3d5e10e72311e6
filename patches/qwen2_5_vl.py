"""Qwen2.5-VL (`model_type: qwen2_5_vl`): transformers' own modeling code. The native patches apply as for
Qwen2-VL; the tower's window attention is made static by the export wrapper (export/vision.py)."""

from surgery.export.vl_arch import QWEN2_5_VL_SPEC

from .native_rules import native_pack

PACK = native_pack("qwen2_5_vl", family="qwen2_5_vl", model_types=("qwen2_5_vl",),
                   architecture="Qwen2_5_VLForConditionalGeneration", export_spec=QWEN2_5_VL_SPEC,
                   summary="Qwen2.5-VL (transformers modeling_qwen2_5_vl): windowed vision graph + "
                           "multimodal-RoPE decoder")
