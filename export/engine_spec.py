"""What MNN's engine graph (export/engine.py) needs from a family beyond the block contract, as data on the
pack's `ArchSpec.engine`.

The block contract (export/arch.py) is enough to run every layer, but the engine graph differs from our
per-block export in two places that are family-specific:

- RoPE at arbitrary absolute positions: the engine feeds `position_ids`, not a table prefix, so cos/sin are
  computed in the graph from the model's own rotary state (`rotary` is where it lives, `rope` how to ask it).
- The attention core is swapped, while tracing, for one `FusedAttention` node over q/k/v after RoPE (MNN's
  `Attention` op keeps the KV cache). transformers' own decoders keep that core as a module-level function,
  `eager_attention_forward(module, q, k, v, mask, scaling)`; Qwen-v1 remote code as a method,
  `QWenAttention._attn(q, k, v, causal_mask, attention_mask, head_mask)`. Both take q/k/v as [B, heads, S, D]
  and return [B, S, heads, D] first, so one fused body (export/engine.py `fused_attention`) serves both through
  a drop-in with the core's own signature. Families whose core is inline code swap a whole method or module
  (export/engine_remote.py).

Imports torch only inside functions, like export/arch.py: packs import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

# Qwen-v1 builds ChatML in code (`make_context`, default system prompt) and its tokenizer_config carries no
# template; the engine applies this one (the same text Qwen1.5+ ships as its jinja template).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass(frozen=True)
class EngineSpec:
    """Where a family's attention core and rotary state are, for the one-graph engine export."""

    attention: str  # the attention submodule of one layer (the module the core is called on)
    core: str  # the attention core's name, swapped for `fused` while tracing
    core_scope: Literal["module", "class"]  # a function of the attention's modeling module, or a method of its class
    fused: Callable  # drop-in with the core's signature, routing to export/engine.py `fused_attention`
    rotary: str  # the model's rotary module (its buffers become graph constants, it has no parameters)
    # rope(rotary, hidden [1, S, H], position_ids int [1, S]) -> cos, sin [1, S, rot_dim], what call_block takes
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    chat_template: str | None = None  # for llm_config.json when the tokenizer ships none
    # unsupported(model) -> why this model of the family cannot be one engine graph (one line), or None
    unsupported: Callable[[torch.nn.Module], str | None] | None = None


def native_rope(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """transformers' rotary modules take positions directly (any rope scaling they apply is applied)."""
    return rotary(hidden, position_ids)


def native_fused(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """`eager_attention_forward`'s signature."""
    from surgery.export.engine import fused_attention

    return fused_attention(module, query, key, value, attention_mask, scaling)


def qwen_rope(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """Qwen-v1's `RotaryEmbedding` only returns a prefix table (`rotary(seq_len)`); its rows are
    cos/sin(pos * inv_freq) duplicated over both halves, so they are computed from its own `inv_freq` at the
    given positions. Dynamic NTK, which rewrites inv_freq, is switched off by the pack's config edits."""
    import torch

    freqs = position_ids[0].to(torch.float32)[:, None] * rotary.inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(hidden.dtype), emb.sin()[None].to(hidden.dtype)


def qwen_fused(self, query, key, value, causal_mask=None, attention_mask=None, head_mask=None):
    """`QWenAttention._attn`'s signature (every revision: q/k/v [B, heads, S, D] after RoPE, out [B, S, heads, D]).
    The patched model passes no causal mask (the additive mask input masks) and no head mask."""
    from surgery.export.engine import fused_attention

    scaling = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
    return fused_attention(self, query, key, value, attention_mask, scaling)


NATIVE_ENGINE = EngineSpec(attention="self_attn", core="eager_attention_forward", core_scope="module",
                           fused=native_fused, rotary="model.rotary_emb", rope=native_rope)
QWEN_ENGINE = EngineSpec(attention="attn", core="_attn", core_scope="class", fused=qwen_fused,
                         rotary="transformer.rotary_emb", rope=qwen_rope, chat_template=CHATML)
