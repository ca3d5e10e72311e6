"""Export spec pieces for the Baichuan2 remote code: one spec serves both position schemes, told apart by the
model itself (7B attention has a `rotary_emb`, 13B does not).

The block contract hands a block rows of constant tables gathered by `position_ids`. Baichuan2-7B layers
gather their own rotary rows from `position_ids`, so its table is the positions themselves (int64: exact at
any length and dtype) and the layer's own gather does the rest, as its `forward` always did.

Baichuan2-13B adds ALiBi: head h scores key j with `slope_h * j`. It is carried as a constant table
`T[p, h] = slope_h * p` gathered by position, not folded into the mask input: the mask stays the host's
[1, 1, S, S] 0/-10000 tensor every runtime builds without knowing the family (a per-head mask would be H times
larger, per step, and family-specific). Inside the block the bias is `T[key] - T[query]`: per query row that
differs from upstream's `slope_h * j` by a constant, which softmax ignores, and it stays near zero for near
keys instead of growing with the position (fp16-safe). Decode keys are the SEQ history slots, slot j holding
position j (the runtime convention), then the new token: the history half is a constant.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes as Baichuan2-13B computes them: a geometric series from 2^(-8/n) for a power of two n;
    otherwise the largest power of two below n, then every other slope of the series for twice that."""
    def series(k: int) -> list[float]:
        start = 2.0 ** (-8.0 / k)
        return [start ** (i + 1) for i in range(k)]

    if math.log2(n).is_integer():
        return series(n)
    low = 2 ** math.floor(math.log2(n))
    return series(low) + alibi_slopes(2 * low)[0::2][: n - low]


def _uses_rope(model_or_block: torch.nn.Module) -> bool:
    return any(name.endswith("rotary_emb") for name, _ in model_or_block.named_modules())


def baichuan_tables(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """7B: positions [seq, 1] int64; 13B: the ALiBi table [seq, heads] float32 (both passed twice: the contract
    has two tables)."""
    if _uses_rope(model):
        positions = torch.arange(seq)[:, None]
        return positions, positions
    slopes = torch.tensor(alibi_slopes(model.config.num_attention_heads))
    table = torch.arange(seq, dtype=torch.float32)[:, None] * slopes[None]
    return table, table


def _bhsd(past: tuple[torch.Tensor, torch.Tensor] | None):
    return None if past is None else (past[0].transpose(1, 2), past[1].transpose(1, 2))


def baichuan_block(block, hidden, rows, _rows, mask, past):
    """A `DecoderLayer` (7B) or `BaichuanLayer` (13B) patched by the baichuan pack; caches are [B, H, S, D]
    there and BSHD in the contract."""
    if _uses_rope(block):
        out = block(hidden, attention_mask=mask, position_ids=rows[..., 0], past_key_value=_bhsd(past),
                    use_cache=True)
    else:
        query = rows[0]  # [S, H]: slope_h * position
        keys = query
        if past is not None:
            slopes = torch.tensor(alibi_slopes(query.shape[-1]))
            history = torch.arange(past[0].shape[1], dtype=torch.float32)[:, None] * slopes[None]
            keys = torch.cat([history, query])
        bias = (keys[None, :, :] - query[:, None, :]).permute(2, 0, 1)[None]  # [1, H, S, K]
        out = block(hidden, attention_mask=mask + bias.to(mask.dtype), past_key_value=_bhsd(past), use_cache=True)
    k, v = out[1]
    return out[0], k.transpose(1, 2), v.transpose(1, 2)


def normalize_rows(rows: torch.Tensor) -> torch.Tensor:
    """NormHead's fold: each vocabulary row scaled to unit L2 norm (row-wise, so chunks fold exactly)."""
    return torch.nn.functional.normalize(rows.float(), dim=-1)
