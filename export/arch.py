"""Per-architecture export specs: where the pieces live and how one block is called.

A spec is data plus one small call function; the wrappers in `blocks.py` are shared by every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch

# call_block(block, hidden, cos, sin, mask, past) -> (hidden, k, v); cos/sin are [1, S, D] for the
# tokens being processed, past is (history_k, history_v) or None, k/v are this step's only.
BlockCall = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    embedding: str
    layers: str
    final_norm: str
    lm_head: str
    rope_tables: Callable[[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor]]  # -> cos, sin [SEQ, D]
    call_block: BlockCall
    num_kv_heads: Callable[[object], int]
    head_dim: Callable[[object], int]

    def part(self, model: torch.nn.Module, path: str):
        return attrgetter(path)(model)


def _qwen_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = model.transformer.rotary_emb(seq)  # [1, seq, 1, D]
    return cos[0, :, 0].detach().clone(), sin[0, :, 0].detach().clone()


def _qwen_block(block, hidden, cos, sin, mask, past):
    out = block(hidden, rotary_pos_emb_list=[[cos.unsqueeze(2), sin.unsqueeze(2)]], layer_past=past,
                attention_mask=mask, use_cache=True)
    return out[0], out[1][0], out[1][1]


QWEN_V1 = ArchSpec(
    model_types=("qwen",),
    embedding="transformer.wte",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    rope_tables=_qwen_rope,
    call_block=_qwen_block,
    num_kv_heads=lambda c: c.num_attention_heads,
    head_dim=lambda c: c.kv_channels,
)

def _native_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(seq)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, positions)  # [1, seq, D], attention scaling applied
    return cos[0].detach().clone(), sin[0].detach().clone()


def _cache_keyword(block: torch.nn.Module) -> str:
    """The layer's name for its cache argument: `cache` from transformers 5.24, `past_key_values` before."""
    params = inspect.signature(block.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _native_block(block, hidden, cos, sin, mask, past):
    hidden, (k, v) = block(hidden, attention_mask=mask, position_embeddings=(cos, sin),
                           **{_cache_keyword(block): past})
    return hidden, k, v


NATIVE = ArchSpec(
    model_types=(),  # every pack built with patches.native.native_pack (see spec_for)
    embedding="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rope_tables=_native_rope,
    call_block=_native_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
)

SPECS = {t: spec for spec in (QWEN_V1,) for t in spec.model_types}


def spec_for(model_type: str) -> ArchSpec | None:
    """The export spec for a model type: a declared one, else NATIVE for families whose pack takes its
    modeling file from transformers (so a pack scaffolded with `surgery port --like llama` exports too)."""
    if model_type in SPECS:
        return SPECS[model_type]
    from surgery.packs import pack_for_model_type

    pack = pack_for_model_type(model_type)
    return NATIVE if pack is not None and pack.sources else None
