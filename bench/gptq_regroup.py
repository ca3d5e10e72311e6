"""What TPU-MLIR's W4 re-quantization does to a GPTQ act-order linear quantized the way GPTQ does it.

The fixtures are packed by round-to-nearest, whose groups almost always use both codes 0 and 15, and on
such a group TPU-MLIR's min/max quantization gives back the checkpoint's codes exactly. GPTQ proper
computes a group's scale and zero when it reaches the group and then keeps correcting the group's columns
for the error of the earlier ones, so a group's codes need not reach 0 or 15. This runs GPTQ (the
reference algorithm, fixtures/gptq.py) on one random linear with calibration inputs that have a few
outlier channels, packs it as the checkpoints store it (fp16
scales, codes recomputed from them), and reports for TPU-MLIR's quantization (lib/.../A16MatMul
`computePerGroupParam` / `weightQuantization`: raw min/max, scale (max - min) / 15, zp clamp(-round(min /
scale))) of the regrouped weights: how many groups span 0..15, how many codes come back, and the cosine of
weights and outputs against the checkpoint, beside the same for the scattered weights.

    .venv/bin/python bench/gptq_regroup.py                     # 896 x 896, group 128 (Qwen2-0.5B's q_proj shape)
    .venv/bin/python bench/gptq_regroup.py --n 4864 --k 896 --group 32
"""

from __future__ import annotations

import argparse

import torch

from surgery.fixtures.gptq import calibration, gptq


def tpu_mlir(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TPU-MLIR's W4 asymmetric per-group quantization of `weight` [N, K]: codes and the dequantized weight."""
    n, k = weight.shape
    g = weight.double().reshape(n, k // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zp = torch.clamp(-torch.round(low / scale), 0, 15)
    codes = torch.clamp(torch.round(g / scale) + zp, 0, 15)
    return codes.reshape(n, k), ((codes - zp) * scale).reshape(n, k).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=896)
    parser.add_argument("--k", type=int, default=896)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    w = torch.randn(a.n, a.k, generator=gen, dtype=torch.float64) * 0.02
    x = calibration(a.k, a.samples, gen)
    codes, zeros, scales, g_idx = gptq(w, x, a.group)
    codes, g_idx = codes.t().double(), g_idx.long()  # [N, K]
    weight = ((codes - zeros[g_idx].t()) * scales.float()[g_idx].t()).float()  # the checkpoint's dequantized weight
    perm = torch.argsort(g_idx, stable=True)
    cos = torch.nn.functional.cosine_similarity
    test = x[: 256].float()
    rows = []
    for name, order in (("regrouped", perm), ("scattered", torch.arange(a.k))):
        got_codes, again = tpu_mlir(weight[:, order], a.group)
        rows.append((name, float((got_codes == codes[:, order]).float().mean()),
                     float(cos(again.flatten(), weight[:, order].flatten(), 0)),
                     float(cos((test[:, order] @ again.t()).flatten(), (test @ weight.t()).flatten(), 0))))
    grouped = codes[:, perm].reshape(a.n, -1, a.group)
    span = ((grouped.amin(-1) == 0) & (grouped.amax(-1) == 15)).float().mean()
    print(f"GPTQ act-order {a.n}x{a.k}, group {a.group}: {float(span):.4f} of (row, group) pairs use both 0 and 15")
    for name, same, wcos, ycos in rows:
        print(f"TPU-MLIR W4 of the {name} weights: codes equal {same:.4f}, weight cosine {wcos:.7f}, "
              f"output cosine {ycos:.7f}")


if __name__ == "__main__":
    main()
