"""Export specs of vision-language families: the language model's pieces under the VL wrapper, its
multimodal RoPE, and the vision tower (export/vision.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from surgery.export.arch import ArchSpec, native_block
from surgery.export.vision_spec import VisionSpec

if TYPE_CHECKING:
    import torch


def qwen2_vl_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text rotary table [seq, D] for 1-D positions. Multimodal RoPE only chooses, per frequency, which
    position component indexes this one table (export/blocks.py gathers per component)."""
    import torch

    positions = torch.arange(seq)[None]
    probe = torch.zeros(1, dtype=model.model.language_model.embed_tokens.weight.dtype)  # the blocks' dtype
    cos, sin = model.model.language_model.rotary_emb(probe, positions)  # [1, seq, D]: three equal components
    return cos[0].detach().clone(), sin[0].detach().clone()


def _text(config: object) -> object:
    return config.get_text_config()


QWEN2_VL_SPEC = ArchSpec(
    embedding="model.language_model.embed_tokens",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    rope_tables=qwen2_vl_rope,
    call_block=native_block,
    num_kv_heads=lambda c: _text(c).num_key_value_heads,
    head_dim=lambda c: _text(c).hidden_size // _text(c).num_attention_heads,
    mrope_section=lambda c: tuple(_text(c).rope_parameters["mrope_section"]),
    checkpoint_prefixes=(("model.language_model.", "model."), ("model.visual.", "visual.")),
    vision=VisionSpec(path="model.visual", config="vision_config", default_size=(448, 448),
                      wrapper="Qwen2VisionGraph"),
)
# Qwen2.5-VL: the same language model and checkpoint layout; the tower adds window attention
QWEN2_5_VL_SPEC = replace(QWEN2_VL_SPEC, vision=replace(QWEN2_VL_SPEC.vision, wrapper="Qwen25VisionGraph"))
