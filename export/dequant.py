"""GPTQ and AWQ integer codes back to the float weight `[out_features, in_features]` a Linear holds.

Exact by construction: codes and zero points are small integers and scales are fp16, so
`(code - zero) * scale` computed in fp32 is the very number the format's own kernels multiply with.
Layouts (in_features = K, out_features = N, p = 32 // bits codes per int32, lowest bits first):

- GPTQ: qweight `[K / p, N]` packs p consecutive input channels; qzeros `[groups, N / p]` packs p output
  channels; scales `[groups, N]`; g_idx `[K]` names each input channel's group (act-order permutes it).
- AWQ GEMM: qweight `[K, N / p]` and qzeros `[K / group, N / p]` both pack output channels, in the
  interleaved order 0 2 4 6 1 3 5 7 (slot i of an int32 holds channel AWQ_ORDER[i] of its eight).
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError
from surgery.export.quant_config import SourceQuant

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`[R, C]` int32 -> `[R * p, C]` codes: row r holds rows r*p .. r*p+p-1, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`[R, C]` int32 -> `[R, C * p]` codes: column c holds columns c*p .. c*p+p-1, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.to(torch.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def awq_columns(n: int) -> torch.Tensor:
    """For each output channel, the unpacked slot that holds it (undoes AWQ's interleave)."""
    slot_of = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
    channel = torch.arange(n)
    return channel // 8 * 8 + slot_of[channel % 8]


def gptq_weight(q: SourceQuant, name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None) -> torch.Tensor:
    """The float `[N, K]` weight of one GPTQ Linear (`name` only for error messages)."""
    codes = unpack_rows(qweight, q.bits)  # [K, N]
    zeros = unpack_cols(qzeros, q.bits) + q.zero_offset  # [groups, N]; v1: 15 + 1 = 16 as its kernels read it
    k, n = codes.shape
    if g_idx is None:
        g_idx = torch.arange(k) // (q.group_size if q.group_size > 0 else k)
    _check(name, scales.shape == zeros.shape and scales.shape[1] == n and g_idx.shape == (k,),
           f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, g_idx "
           f"{tuple(g_idx.shape)} do not fit {q.bits}-bit GPTQ packing")
    groups = g_idx.long()
    _check(name, int(groups.min()) >= 0 and int(groups.max()) < scales.shape[0],
           f"g_idx names group {int(groups.max())} but scales has {scales.shape[0]}")
    return ((codes - zeros[groups]).float() * scales.float()[groups]).t().contiguous()


def awq_weight(q: SourceQuant, name: str, qweight: torch.Tensor, qzeros: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """The float `[N, K]` weight of one AWQ GEMM Linear."""
    k, n = qweight.shape[0], qweight.shape[1] * 32 // q.bits
    _check(name, scales.shape == (k // q.group_size, n) and qzeros.shape == (k // q.group_size, qweight.shape[1])
           and k % q.group_size == 0,
           f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)} do not fit "
           f"AWQ GEMM packing with group_size {q.group_size}")
    order = awq_columns(n)
    codes = unpack_cols(qweight, q.bits)[:, order]  # [K, N]
    zeros = unpack_cols(qzeros, q.bits)[:, order]  # [groups, N]
    groups = torch.arange(k) // q.group_size
    return ((codes - zeros[groups]).float() * scales.float()[groups]).t().contiguous()


def _check(name: str, ok: bool, why: str) -> None:
    if not ok:
        raise SurgeryError(f"{name}: {why}; the checkpoint does not match its quantization config")
