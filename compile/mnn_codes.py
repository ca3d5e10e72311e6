"""A GPTQ/AWQ checkpoint's own integer codes written into `llm.mnn.weight`: no second quantization.

MNN's asymmetric block storage (compile/mnn_weights.py) decodes a stored value v of a (row, block) as
`w = (v - 2^(b-1)) * scale + zero`. A checkpoint group decodes as `w = s * (code - z)`. Storing v = code,
scale = s and zero = s * (2^(b-1) - z) makes the two the same numbers, so MNN runs the checkpoint's codes
and scales as they are, whenever MNN's block is the checkpoint's group: same bits, the same group size,
and groups of consecutive input channels. An act-order linear, whose g_idx scatters a group's channels,
reaches MNN with its input channels sorted by group (export/act_order.py), and its codes are permuted the
same way, so its groups are consecutive too. Other linears, and linears a LoRA adapter changes, fall back to
quantizing the float weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.compile.mnn_weights import append_entry, pack
from surgery.export.act_order import Regroup, RegroupedIndex
from surgery.export.dequant import awq_columns, unpack_cols, unpack_rows
from surgery.export.lora import MergedIndex
from surgery.export.quantized import DequantizedIndex


@dataclass(frozen=True)
class Codes:
    """One linear as the checkpoint stores it, laid out per output row: codes [N, K] in 0 .. 2^bits - 1,
    zeros and scales [N, groups], consecutive groups of `group` input channels."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    bits: int
    group: int


def codes_of(index: DequantizedIndex, module: str, regroup: Regroup | None = None) -> Codes | None:
    """The checkpoint's codes of `module`, or None when MNN's blocks cannot hold them as they are;
    `regroup`: the permutations export gave the act-order linears' columns and rows."""
    q = index.quant
    if module not in index.modules:
        return None
    parts = ["qweight", "qzeros", "scales"] + (["g_idx"] if f"{module}.g_idx" in index.base.files else [])
    t = index.base.read(f"{module}.{p}" for p in parts)
    qweight, qzeros, scales = (t[f"{module}.{p}"] for p in parts[:3])
    if q.method == "awq":
        order = awq_columns(qweight.shape[1] * 32 // q.bits)
        codes, zeros = unpack_cols(qweight, q.bits)[:, order], unpack_cols(qzeros, q.bits)[:, order]
    else:
        codes, zeros = unpack_rows(qweight, q.bits), unpack_cols(qzeros, q.bits) + q.zero_offset
    k = codes.shape[0]
    group = q.group_size if q.group_size > 0 else k
    consecutive = torch.arange(k) // group
    regroup = regroup or Regroup()
    if module in regroup.columns:  # act-order, exported with its channels sorted by group
        g_idx, codes = t[f"{module}.g_idx"].long()[regroup.columns[module]], codes[regroup.columns[module]]
    else:
        g_idx = t[f"{module}.g_idx"].long() if "g_idx" in parts else consecutive
    if not torch.equal(g_idx, consecutive):
        return None  # a group's channels are scattered
    if module in regroup.rows:  # gate/up rows in down_proj's order
        codes, zeros, scales = (x[:, regroup.rows[module]] for x in (codes, zeros, scales))
    if k % group or scales.shape[0] != k // group or int(zeros.max()) > (1 << q.bits) - 1:
        return None  # e.g. a GPTQ v1 zero of 0, stored as 15 and read as 16: off MNN's grid
    return Codes(codes.t().contiguous(), zeros.t().contiguous(), scales.float().t().contiguous(), q.bits, group)


class CheckpointCodes:
    """Engine linear name -> the checkpoint's codes for it, when export reads a quantized checkpoint."""

    def __init__(self, weights) -> None:
        resident = weights.resident
        self.index = _dequantized(resident.index)
        self.regroup = resident.index.regroup if isinstance(resident.index, RegroupedIndex) else None
        merged = _layer(resident.index, MergedIndex)
        self.adapted = {m for m in (merged.adapter.modules if merged else ())}
        paths = {id(m): n for n, m in resident.model.named_modules()}
        self.modules = {name: paths.get(id(linear)) for name, linear in weights.linears.items()}
        self.used: list[str] = []  # checkpoint modules written with their own codes

    def __call__(self, name: str, bits: int, block: int) -> Codes | None:
        module = self.modules.get(name)
        if self.index is None or module is None or module in self.adapted:
            return None
        codes = codes_of(self.index, module, self.regroup)
        if codes is None or codes.bits != bits or codes.group != block:
            return None
        self.used.append(module)
        return codes


def _dequantized(index) -> DequantizedIndex | None:
    return _layer(index, DequantizedIndex)


def _layer(index, kind: type):
    """The layer of type `kind` in a stack of derived indexes (regrouped over merged over dequantized)."""
    while index is not None and not isinstance(index, kind):
        index = getattr(index, "base", None)
    return index


def write_codes(file, codes: Codes, bias: torch.Tensor | None) -> tuple[list[int], bool]:
    """Append one linear in MNN's asymmetric block storage, values and scales from the checkpoint;
    returns its `external` entry and whether its dims are int32 (mnn_weights.append_entry)."""
    n, k = codes.codes.shape
    zero = codes.scales * ((1 << (codes.bits - 1)) - codes.zeros.float())
    pairs = torch.stack([zero.flatten(), codes.scales.flatten()], -1).flatten().numpy().astype("<f4")
    stored = pack(codes.codes.to(torch.uint8).flatten().numpy(), codes.bits)
    return append_entry(file, n, k, codes.bits, [(stored, pairs)], bias)
