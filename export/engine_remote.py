"""Engine specs (export/engine_spec.py) for the remote-code families whose attention core is inline code:
InternLM2, MiniCPM, Baichuan2-7B and ChatGLM2/3.

MNN's engine graph replaces each layer's attention core (softmax(q k^T) v over the cache) by one
`FusedAttention` node, so the core must be something to swap while tracing. transformers' decoders and
Qwen-v1 keep it as a function or method; ChatGLM2/3 as a module (`CoreAttention`), swapped whole. InternLM2,
MiniCPM and Baichuan2 write it inline in the attention's `forward`, between the cache concat and the output
projection, so there the whole `forward` is the drop-in: the module's own projections (InternLM2's grouped
`wqkv`, Baichuan2's `W_pack`), its own `apply_rotary_pos_emb` from its modeling file, the fused node, its own
output projection. That is what MNN's `llmexport` does for every family (its own Attention class over the
model's mapped linears). The drop-ins never run outside tracing: the engine's check computes the patched
model's own forward (export/engine_reference.py), so a drop-in that drifts from the model fails that check.

Imports torch only inside functions, like export/engine_spec.py: packs import this module.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from surgery.export.engine_spec import EngineSpec

if TYPE_CHECKING:
    import torch


def _own(module: torch.nn.Module, name: str):
    """A function of the module's own modeling file (its rotary convention, not ours)."""
    return getattr(sys.modules[type(module).__module__], name)


def _fused(module, query, key, value, mask):
    from surgery.export.engine import fused_attention

    return fused_attention(module, query, key, value, mask, module.head_dim ** -0.5)[0]


def llama_remote_rope(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """InternLM2 / MiniCPM: cos/sin(pos * inv_freq) duplicated over both halves, from the layer's own rotary
    module, at the engine's absolute positions. A linear-scaling module divides positions by its factor; a
    dynamic NTK module is an identity up to max_position_embeddings (past it the model would change its base
    with the key length, which one static graph cannot: positions beyond that are unscaled here)."""
    import torch

    pos = position_ids[0].to(torch.float32)
    if "Linear" in type(rotary).__name__:
        pos = pos / rotary.scaling_factor
    freqs = pos[:, None] * rotary.inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(hidden.dtype), emb.sin()[None].to(hidden.dtype)


def internlm2_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                      output_attentions=False, use_cache=False, **kwargs):
    """`InternLM2Attention.forward`: packed `wqkv` in its grouped layout (per K/V head: its query heads, then
    the key, then the value), the caller's cos/sin rows (the pack's `rotary-input`), `wo`."""
    b, s, _ = hidden_states.shape
    qkv = self.wqkv(hidden_states).view(b, s, self.num_key_value_heads, self.num_key_value_groups + 2,
                                        self.head_dim)
    query = qkv[..., :-2, :].reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
    key, value = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query, key = _own(self, "apply_rotary_pos_emb")(query, key, cos, sin, position_ids)
    out = _fused(self, query, key, value, attention_mask)
    return self.wo(out.reshape(b, s, -1)), None, (key, value)


def minicpm_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                    output_attentions=False, use_cache=False, **kwargs):
    """`MiniCPMAttention.forward` (Llama's): q/k/v/o projections, the caller's cos/sin rows."""
    b, s, _ = hidden_states.shape
    query = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(b, s, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query, key = _own(self, "apply_rotary_pos_emb")(query, key, cos, sin, position_ids)
    out = _fused(self, query, key, value, attention_mask)
    return self.o_proj(out.reshape(b, s, -1)), None, (key, value)


def baichuan_rope(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """Baichuan2-7B's layers gather their own rotary rows by position (export/arch_baichuan.py): the block
    call takes the positions themselves, [1, S, 1] int64."""
    import torch

    positions = position_ids.to(torch.int64)[..., None]
    return positions, positions


def baichuan_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                     output_attentions=False, use_cache=False):
    """Baichuan2-7B `Attention.forward`: `W_pack` as [q | k | v], rows of the rotary module's whole cached
    table gathered at the engine's absolute positions (the model slices it to the key length first, which in
    one graph would be the prompt's length), `o_proj`."""
    b, s, _ = hidden_states.shape
    query, key, value = self.W_pack(hidden_states).view(b, s, 3, self.num_heads, self.head_dim).permute(
        2, 0, 3, 1, 4)
    rotary = self.rotary_emb
    query, key = _own(self, "apply_rotary_pos_emb")(query, key, rotary.cos_cached, rotary.sin_cached, position_ids)
    out = _fused(self, query, key, value, attention_mask)
    return self.o_proj(out.reshape(b, s, -1)), None, (key, value)


def baichuan_unsupported(model: torch.nn.Module) -> str | None:
    """Baichuan2-13B (no rotary module: ALiBi) cannot be one engine graph."""
    if any(name.endswith("rotary_emb") for name, _ in model.named_modules()):
        return None
    return ("Baichuan2-13B's ALiBi (a per-head bias over every cached key) cannot run in MNN's engine layout: "
            "MNN's Attention op adds one mask shared by all heads to the current tokens only (cached keys "
            "get none), and llmexport has no ALiBi either; use --layout graphs")


def chatglm_rope(rotary: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """ChatGLM2/3: cos/sin(pos * theta) [1, S, rot/2], one angle per interleaved pair of the rotated half of
    each head (what `chatglm_block` takes). theta as the module's `forward_impl` computes it, in fp32 from its
    `base` default times ChatGLM3's `rope_ratio`, not from the `inv_freq` buffer: that one is stored in the
    checkpoint's dtype (bf16 rounding would move angles by radians a few thousand positions in)."""
    import inspect

    import torch

    base = inspect.signature(rotary.forward_impl).parameters["base"].default
    base = base * float(getattr(rotary, "rope_ratio", 1) or 1)
    theta = 1.0 / (base ** (torch.arange(0, rotary.dim, 2, dtype=torch.float32) / rotary.dim))
    angles = position_ids[0].to(torch.float32)[:, None] * theta[None, :]
    return angles.cos()[None].to(hidden.dtype), angles.sin()[None].to(hidden.dtype)


def chatglm_core(self, query_layer, key_layer, value_layer, attention_mask):
    """`CoreAttention.forward`: q/k/v [S, B, heads, D] after RoPE, K/V already repeated over the heads of a
    multi-query group (the group's K/V repeated `heads // groups` times, group-major), out [S, B, hidden].
    One head per group is taken back, so MNN's cache holds the groups only. Its layer-number scaling divides
    and multiplies back: the scale is 1/sqrt(D)."""
    from surgery.export.engine import fused_attention

    slot = self.surgery_fused_slot
    step = slot.heads // slot.kv_heads
    query, key, value = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer[:, :, ::step],
                                                          value_layer[:, :, ::step]))
    out = fused_attention(self, query, key, value, attention_mask, slot.head_dim ** -0.5)[0]
    return out.flatten(2).transpose(0, 1)


INTERNLM2_ENGINE = EngineSpec(attention="attention", core="forward", core_scope="class", fused=internlm2_forward,
                              rotary="model.layers.0.attention.rotary_emb", rope=llama_remote_rope)
MINICPM_ENGINE = EngineSpec(attention="self_attn", core="forward", core_scope="class", fused=minicpm_forward,
                            rotary="model.layers.0.self_attn.rotary_emb", rope=llama_remote_rope)
BAICHUAN_ENGINE = EngineSpec(attention="self_attn", core="forward", core_scope="class", fused=baichuan_forward,
                             rotary="model.layers.0.self_attn.rotary_emb", rope=baichuan_rope,
                             unsupported=baichuan_unsupported)
CHATGLM_ENGINE = EngineSpec(attention="self_attention.core_attention", core="forward", core_scope="class",
                            fused=chatglm_core, rotary="transformer.rotary_pos_emb", rope=chatglm_rope)
