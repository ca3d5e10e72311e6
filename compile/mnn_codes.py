"""A GPTQ/AWQ checkpoint's own integer codes written into `llm.mnn.weight`: no second quantization.

MNN's asymmetric block storage (compile/mnn_weights.py) decodes a stored value v of a (row, block) as
`w = (v - 2^(b-1)) * scale + zero`. A checkpoint group decodes as `w = s * (code - z)`. Storing v = code,
scale = s and zero = s * (2^(b-1) - z) makes the two the same numbers, so MNN runs the checkpoint's codes
and scales as they are, whenever MNN's block is the checkpoint's group: same bits, the same group size,
and groups of consecutive input channels (not act-order, whose g_idx scatters a group's channels). Other
linears, and linears a LoRA adapter changes, fall back to quantizing the float weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from surgery.compile.mnn_weights import header
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


def codes_of(index: DequantizedIndex, module: str) -> Codes | None:
    """The checkpoint's codes of `module`, or None when MNN's blocks cannot hold them as they are."""
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
    if "g_idx" in parts and not torch.equal(t[f"{module}.g_idx"].long(), consecutive):
        return None  # act-order: a group's channels are scattered
    if k % group or scales.shape[0] != k // group or int(zeros.max()) > (1 << q.bits) - 1:
        return None  # e.g. a GPTQ v1 zero of 0, stored as 15 and read as 16: off MNN's grid
    return Codes(codes.t().contiguous(), zeros.t().contiguous(), scales.float().t().contiguous(), q.bits, group)


class CheckpointCodes:
    """Engine linear name -> the checkpoint's codes for it, when export reads a quantized checkpoint."""

    def __init__(self, weights) -> None:
        resident = weights.resident
        self.index = _dequantized(resident.index)
        merged = resident.index if isinstance(resident.index, MergedIndex) else None
        self.adapted = {m for m in (merged.adapter.modules if merged else ())}
        paths = {id(m): n for n, m in resident.model.named_modules()}
        self.modules = {name: paths.get(id(linear)) for name, linear in weights.linears.items()}
        self.used: list[str] = []  # checkpoint modules written with their own codes

    def __call__(self, name: str, bits: int, block: int) -> Codes | None:
        module = self.modules.get(name)
        if self.index is None or module is None or module in self.adapted:
            return None
        codes = codes_of(self.index, module)
        if codes is None or codes.bits != bits or codes.group != block:
            return None
        self.used.append(module)
        return codes


def _dequantized(index) -> DequantizedIndex | None:
    while index is not None and not isinstance(index, DequantizedIndex):
        index = getattr(index, "base", None)
    return index


def write_codes(file, codes: Codes, bias: torch.Tensor | None) -> tuple[list[int], bool]:
    """Append one linear in MNN's asymmetric block storage, values and scales from the checkpoint;
    returns its `external` entry and whether its dims are int32 (as mnn_weights.write_linear does)."""
    n, k = codes.codes.shape
    offset = 1 << (codes.bits - 1)
    start = file.tell()
    head, wide = header(n, k, codes.bits)
    file.write(head)
    stored = codes.codes.to(torch.uint8).flatten().numpy()
    if codes.bits == 4:
        stored = (stored[0::2] << 4) | stored[1::2]
    file.write(stored.tobytes())
    weight_bytes = file.tell() - start
    zero = codes.scales * (offset - codes.zeros.float())
    pairs = torch.stack([zero.flatten(), codes.scales.flatten()], -1).flatten()
    file.write(pairs.numpy().astype("<f4").tobytes())
    scale_bytes = file.tell() - start - weight_bytes
    bias_bytes = file.write(bias.numpy().astype("<f4").tobytes()) if bias is not None else 0
    return [start, weight_bytes, scale_bytes, bias_bytes, 0], wide


def decode(blob: bytes, external: list[int], bits: int, block: int) -> np.ndarray:
    """The float weight MNN's loader reads back from an asymmetric entry (for tests and checks)."""
    start, weight_bytes, scale_bytes = external[:3]
    data = blob[start:start + weight_bytes]
    dims = np.frombuffer(data[1:5], dtype="<i2").astype(np.int64)
    n, k = int(dims[0]), int(dims[1])
    table = data[5] or 256
    packed = np.frombuffer(data[6 + table:], dtype=np.uint8)
    values = np.stack([packed >> 4, packed & 15], -1).flatten() if bits == 4 else packed
    v = values[: n * k].astype(np.float32).reshape(n, k // block, block)
    alpha = np.frombuffer(blob[start + weight_bytes:start + weight_bytes + scale_bytes], dtype="<f4")
    zero, scale = alpha[0::2].reshape(n, -1, 1), alpha[1::2].reshape(n, -1, 1)
    return ((v - (1 << (bits - 1))) * scale + zero).reshape(n, k)
