"""Each quantized format's reference dequantization, written out element by element with numpy and
independently of export/dequant.py's reshapes: tests compare the reader (and exported models) with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def reference_gptq(t: dict[str, np.ndarray], bits: int, v1: bool) -> np.ndarray:
    """GPTQ: input channel k's code sits in qweight[k // p, n] at bits (k % p) * bits; output channel n's
    zero in qzeros[g, n // p] at (n % p) * bits, plus one in v1; W[n, k] = scale * (code - zero), g = g_idx[k]."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    k_all, n_all = np.arange(qweight.shape[0] * per), np.arange(qweight.shape[1])
    codes = (qweight[k_all[:, None] // per, n_all[None, :]] >> ((k_all[:, None] % per) * bits)) & mask
    zeros = (qzeros[:, n_all // per] >> ((n_all % per) * bits)) & mask
    zeros = zeros.astype(np.int64) + (1 if v1 else 0)
    g = t["g_idx"].astype(np.int64)
    return ((codes.astype(np.int64) - zeros[g]) * t["scales"].astype(np.float32)[g]).T


def reference_awq(t: dict[str, np.ndarray], group: int) -> np.ndarray:
    """AWQ GEMM: output channel n is slot i of int32 n // 8 where order[i] == n % 8, order 0 2 4 6 1 3 5 7;
    W[n, k] = scale[k // group, n] * (code - zero)."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    slot = np.array([order.index(j) for j in range(8)])
    qweight, qzeros = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    n_all = np.arange(qweight.shape[1] * 8)
    codes = (qweight[:, n_all // 8] >> (slot[n_all % 8] * 4)) & 15
    zeros = (qzeros[:, n_all // 8] >> (slot[n_all % 8] * 4)) & 15
    g = np.arange(qweight.shape[0]) // group
    return ((codes.astype(np.int64) - zeros.astype(np.int64)[g]) * t["scales"].astype(np.float32)[g]).T


def dequantized_state(model: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with every packed Linear replaced by its reference float weight."""
    config = json.loads((model / "config.json").read_text())
    declared = config.get("quantization_config") or json.loads((model / "quantize_config.json").read_text())
    stored = {k: v.numpy() for k, v in load_file(str(model / "model.safetensors")).items()}
    state = {}
    for key, value in stored.items():
        if key.endswith(".qweight"):
            module = key[: -len(".qweight")]
            parts = {p: stored[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")
                     if f"{module}.{p}" in stored}
            if declared["quant_method"] == "awq":
                weight = reference_awq(parts, declared["group_size"])
            else:
                weight = reference_gptq(parts, declared["bits"], declared.get("checkpoint_format", "gptq") == "gptq")
            state[f"{module}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = torch.from_numpy(value).float()
    return state
