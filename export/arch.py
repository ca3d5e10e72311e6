"""The export spec type: where an architecture's pieces live and how one block is called, plus the block
call functions the built-in packs use.

A spec is data plus small call functions; the wrappers in `blocks.py` are shared by every family. Specs
are declared on the pack (`Pack.export_spec`), next to the patches that make the block contract hold,
so this module keeps no registry. It imports torch only inside the functions: packs import it, and
`surgery list` / `apply` must not pay for torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from surgery.export.engine_spec import EngineSpec
    from surgery.export.vision_spec import VisionSpec

# call_block(block, hidden, cos, sin, mask, past) -> (hidden, k, v); cos/sin are [1, S, D] for the
# tokens being processed, past is (history_k, history_v) or None, k/v are this step's only.
BlockCall = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class ArchSpec:
    embedding: str
    layers: str
    final_norm: str
    lm_head: str
    rope_tables: Callable[[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor]]  # -> cos, sin [SEQ, D]
    call_block: BlockCall
    num_kv_heads: Callable[[object], int]
    head_dim: Callable[[object], int]
    engine: EngineSpec | None = None  # MNN's one-graph engine layout (export/engine_spec.py); None: not offered
    # work the model does outside its layers, where the block contract cuts it (MiniCPM's muP scales): the
    # embedding graph multiplies its rows by embedding_scale(config), the head divides the final hidden
    # states by head_divisor(config) before the norm's output reaches lm_head; None: nothing
    embedding_scale: Callable[[object], float] | None = None
    head_divisor: Callable[[object], float] | None = None
    # a row-wise fold of the head's weight rows, applied wherever export and verify read that table from the
    # checkpoint (Baichuan2's NormHead: rows normalized once, so the graph is a plain product); None: rows as stored
    head_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    # multimodal RoPE (Qwen2-VL): rotary frequencies per position component (temporal, height, width); the
    # blocks then take position_ids [3, 1, S] and gather each section of the table by its own component
    mrope_section: Callable[[object], tuple[int, ...]] | None = None
    vision: VisionSpec | None = None  # a VL model's vision tower, exported as the `vision` graph
    # (module prefix, checkpoint prefix) pairs: where the checkpoint stores names the module tree nests elsewhere
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    # the language model's config inside the model config, where `get_text_config()` does not find it (InternVL's
    # remote config keeps it as `llm_config`); None: `get_text_config()` (the config itself for text-only models)
    text_config: Callable[[object], object] | None = None

    def part(self, model: torch.nn.Module, path: str):
        return attrgetter(path)(model)

    def text(self, config: object) -> object:
        """The language model's config: what hidden size, heads and vocabulary are read from."""
        return self.text_config(config) if self.text_config else config.get_text_config()


def qwen_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-v1 remote code: the model's own rotary module, [1, seq, 1, D] -> [seq, D]. The August 2023 revision
    has one per attention (all alike), returning the angles, whose cos and sin its `apply_rotary_pos_emb` took."""
    rotary = getattr(model.transformer, "rotary_emb", None)
    if rotary is None:
        angles = model.transformer.h[0].attn.rotary_emb(seq)
        cos, sin = angles.cos(), angles.sin()
    else:
        cos, sin = rotary(seq)
    return cos[0, :, 0].detach().clone(), sin[0, :, 0].detach().clone()


def qwen_block(block, hidden, cos, sin, mask, past):
    """Qwen-v1 remote code: a `QWenBlock` patched by the qwen pack (returns this step's K/V as present).

    From October 2023 the block takes a per-sample `rotary_pos_emb_list`; the September revisions many
    fine-tunes froze take one `rotary_pos_emb` [cos, sin] pair, as August's do once patched."""
    rotary = [cos.unsqueeze(2), sin.unsqueeze(2)]
    if "rotary_pos_emb_list" in inspect.signature(block.forward).parameters:
        positions = {"rotary_pos_emb_list": [rotary]}
    else:
        positions = {"rotary_pos_emb": rotary}
    out = block(hidden, **positions, layer_past=past, attention_mask=mask, use_cache=True)
    return out[0], out[1][0], out[1][1]


def native_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own decoders: `model.rotary_emb` with attention scaling applied, [seq, D], in the dtype the
    model computes in (the module computes in float32 and casts to its input's dtype, as at run time: a float32
    table in an fp16 block would promote q/k to float32 and fail the attention's matmul with fp16 values)."""
    import torch

    positions = torch.arange(seq)[None]
    probe = torch.zeros(1, dtype=model.model.embed_tokens.weight.dtype)
    cos, sin = model.model.rotary_emb(probe, positions)  # [1, seq, D]
    return cos[0].detach().clone(), sin[0].detach().clone()


def _cache_keyword(block: torch.nn.Module) -> str:
    """The layer's name for its cache argument: `cache` from transformers 5.24, `past_key_values` before."""
    params = inspect.signature(block.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def native_block(block, hidden, cos, sin, mask, past):
    """transformers' own decoders: a layer patched by a native pack (returns (hidden, (k, v)))."""
    hidden, (k, v) = block(hidden, attention_mask=mask, position_embeddings=(cos, sin),
                           **{_cache_keyword(block): past})
    return hidden, k, v


def chatglm_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM2/3 remote code: the model's own rotary cache, [seq, rot/2, 2] (cos, sin) per rotated pair ->
    cos, sin [seq, rot/2], rot being half of each head."""
    cache = model.transformer.rotary_pos_emb(seq)
    return cache[..., 0].detach().clone(), cache[..., 1].detach().clone()


def chatglm_block(block, hidden, cos, sin, mask, past):
    """ChatGLM2/3 remote code: a `GLMBlock` patched by the chatglm pack. It runs sequence-first ([S, 1, H]
    hidden, [S, 1, rot/2, 2] rotary rows, (k, v) caches of [S, 1, kv, hd]); the contract is batch-first."""
    import torch

    rope = torch.stack([cos, sin], dim=-1).transpose(0, 1)
    cache = None if past is None else (past[0].transpose(0, 1), past[1].transpose(0, 1))
    out, (k, v) = block(hidden.transpose(0, 1), mask, rope, kv_cache=cache, use_cache=True)
    return out.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
