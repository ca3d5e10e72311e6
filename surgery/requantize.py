"""What the target compiler's weight re-quantization does to a pre-quantized checkpoint, measured.

The ONNX route into TPU-MLIR and MNNConvert carries float weights, and both compilers quantize them again
(per group of `-g` input channels, min/max asymmetric unless --symmetric; TPU-MLIR's W4BF16/W8BF16,
MNNConvert's --weightQuantBits/--weightQuantBlock). A GPTQ/AWQ checkpoint's dequantized weights are already
on a 4- or 8-bit grid, so re-quantizing them is exact only when the compiler's groups and grid coincide with
the checkpoint's; act-order, a different group size, or a group that does not use its extreme codes all
cost accuracy. This module emulates that quantization on every checkpoint Linear and reports the cosine of
re-quantized against checkpoint weights, so the report says what the second quantization lost.
"""

from __future__ import annotations

import torch

from surgery.compile.base import CompileOptions

# adapter -> does its compile quantize weights from the float graphs (for w4*/w8* modes)
REQUANTIZES = {"sophgo": True, "mnn": True, "onnx": False}


def weight_bits(quantize: str) -> int | None:
    return 4 if quantize.startswith("w4") else 8 if quantize.startswith("w8") else None


def requantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """`weight` `[N, K]` quantized per row in groups of `group` input channels and dequantized again, with
    round to nearest: asymmetric scale (max - min) / (2^bits - 1) and an integer zero point, or symmetric
    scale max|w| / (2^(bits-1) - 1)."""
    n, k = weight.shape
    group = group if 0 < group <= k and k % group == 0 else k
    w = weight.float().reshape(n, k // group, group)
    if symmetric:
        top = (1 << (bits - 1)) - 1
        scale = (w.abs().amax(-1, keepdim=True) / top).clamp(min=1e-12)
        return (torch.clamp(torch.round(w / scale), -top - 1, top) * scale).reshape(n, k)
    maxq = (1 << bits) - 1
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale).reshape(n, k)


def measure(index, modules: list[str], adapter: str, options: CompileOptions) -> dict:
    """Whether `adapter` re-quantizes under `options`, and if so the worst and mean cosine over `modules`
    (the checkpoint's quantized Linears, read one at a time from `index`)."""
    bits = weight_bits(options.quantize)
    requantizes = REQUANTIZES.get(adapter)
    if requantizes is None:
        return {"requantizes": None, "how": f"{adapter}'s toolchain quantizes by its own configuration; "
                                            "not measured"}
    if not requantizes or bits is None:
        return {"requantizes": False, "how": "weights stay the checkpoint's dequantized floats"}
    cosines = {}
    for module in modules:
        name = f"{module}.weight"
        weight = index.read([name])[name].float()
        again = requantize(weight, bits, options.group_size, options.symmetric)
        cosines[module] = float(torch.nn.functional.cosine_similarity(weight.flatten(), again.flatten(), dim=0))
    worst = min(cosines, key=cosines.get)
    return {"requantizes": True, "how": (f"{adapter} re-quantizes to int{bits}, group {options.group_size}, "
                                        f"{'symmetric' if options.symmetric else 'asymmetric'} (emulated)"),
            "min_cosine": cosines[worst], "worst": worst, "mean_cosine": sum(cosines.values()) / len(cosines),
            "linears": len(cosines)}
