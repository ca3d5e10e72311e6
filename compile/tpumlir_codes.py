"""A GPTQ/AWQ checkpoint's integer codes handed to TPU-MLIR as they are, instead of re-quantized.

TPU-MLIR's ONNX route sees float weights, and `model_deploy --quantize W4BF16` re-derives every group's grid
from the group's min and max (A16MatMul lowering, `computePerGroupParam`): exact on a checkpoint group whose
codes reach both 0 and 15, off the checkpoint's grid on any other (GPTQ leaves 7-18% of groups so,
bench/gptq_regroup.py). The lowering keeps the scales and zero points of an A16MatMul that already holds
them (`A16MatMulAdjust` returns early when its scale is a weight), which is how `llm_convert` hands over a
checkpoint; TPU-MLIR's ONNX importer has no way to express that (its DequantizeLinear is per tensor or per
axis). So between model_transform and model_deploy, every `top.MatMul` whose weight lies on a per-group
grid of 2^bits levels (a dequantized checkpoint's weights do, exactly, once act-order groups are contiguous:
export/act_order.py) is rewritten in the top MLIR into `top.A16MatMul` with that grid's codes, scales and
zero points (`right_transpose`, [N, K/2] packed low nibble first, as llm_convert's ModelHandle writes them).
The grid is read off the weights themselves, so no checkpoint is needed where the graph is built: a group's
step is the smallest difference of its values (or a divisor of it), and the codes are accepted only if
`(code - zero) * scale` gives back every weight bit for bit. Weights not on such a grid stay as they were.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

WEIGHT = re.compile(r'^\s*(%\w+) = "top.Weight"\(\) : \(\) -> (tensor<[^>]*>) loc\((#[\w.]+)\)$', re.M)
LOC = re.compile(r'^(#[\w.]+) = loc\("([^"]*)"\)$', re.M)
MATMUL = re.compile(r'^(\s*)(%\w+) = "top.MatMul"\((%\w+), (%\w+), (%\w+)\) \{[^}]*\} : \((tensor<[^>]*>), '
                    r'(tensor<[^>]*>), ([^)]*)\) -> (tensor<[^>]*>) loc\((#[\w.]+)\)$')
WEIGHT_FILE = re.compile(r'module\.weight_file = "([^"]+)"')


def handover_bits(quantize: str, symmetric: bool) -> int | None:
    """The weight bits codes are handed over at: asymmetric W4*/W8* modes (a symmetric compile fixes every
    zero point, which a checkpoint's grid need not have)."""
    return None if symmetric else {"w4": 4, "w8": 8}.get(quantize[:2])


def grid_codes(weight: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`weight` [K, N] (a MatMul's right operand) as codes [N, K] uint8, scales [N, K / group] float32 and
    zero points [N, K / group] uint8 with `(code - zero) * scale == weight` exactly, or None."""
    k, n = weight.shape
    if group <= 0 or k % group:
        return None
    maxq = (1 << bits) - 1
    w = weight.T.astype(np.float64).reshape(n, k // group, group)
    ordered = np.sort(w, axis=-1)
    steps = np.diff(ordered, axis=-1)
    step = np.where(steps > 0, steps, np.inf).min(-1)
    step = np.where(np.isfinite(step), step, np.maximum(np.abs(ordered[..., 0]), 1e-30))  # a constant group
    scale, level, ok = np.zeros_like(step), np.zeros_like(w), np.zeros(step.shape, dtype=bool)
    for divisor in (1, 2, 3, 4, 5):  # codes {1, 3, 5} only: the smallest difference is two steps
        t = w / (step / divisor)[..., None]
        fits = ~ok & np.all(np.abs(t - np.round(t)) < 1e-6, axis=-1)
        scale, level = np.where(fits, step / divisor, scale), np.where(fits[..., None], np.round(t), level)
        ok |= fits
    if not ok.all():
        return None
    low, high = level.min(-1), level.max(-1)
    zero = np.maximum(0, -low)
    if np.any(high + zero > maxq) or np.any(zero > maxq):
        return None
    codes = level + zero[..., None]
    scale32 = scale.astype(np.float32)
    again = ((codes - zero[..., None]).astype(np.float32) * scale32[..., None]).reshape(n, k)
    if not np.array_equal(again, weight.T):
        return None
    return codes.reshape(n, k).astype(np.uint8), scale32, zero.astype(np.uint8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes as A16MatMul's weight: 4 bits two to a byte along K, the even input in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes.astype(np.uint8)


def hand_over(mlir: Path, group: int, bits: int) -> list[str]:
    """Rewrite `mlir` (model_transform's top MLIR) and its weight file in place; returns the names of the
    weights handed over as codes."""
    text = mlir.read_text()
    weight_file = mlir.parent / WEIGHT_FILE.search(text).group(1)
    locs = dict(LOC.findall(text))
    weights = {m.group(1): locs.get(m.group(3)) for m in WEIGHT.finditer(text)}
    arrays = dict(np.load(weight_file))
    lines, new_locs, done = [], [], []
    for line in text.splitlines():
        m = MATMUL.match(line)
        name = weights.get(m.group(4)) if m else None
        found = grid_codes(arrays[name], group, bits) if name in arrays and arrays[name].ndim == 2 else None
        if found is None:
            lines.append(line)
            continue
        indent, result, x, _, bias, tx, _, tb, to, loc = m.groups()
        codes, scales, zeros = found
        tag = result[1:]
        parts = {"q": (f"{name}_codes", pack(codes, bits)), "s": (f"{name}_scales", scales),
                 "z": (f"{name}_zeros", zeros)}
        types = {}
        for key, (label, array) in parts.items():
            arrays[label] = array
            types[key] = f"tensor<{'x'.join(map(str, array.shape))}x{'f32' if array.dtype == np.float32 else 'ui8'}>"
            lines.append(f'{indent}%{key}{tag} = "top.Weight"() : () -> {types[key]} loc(#codes_{key}{tag})')
            new_locs.append(f'#codes_{key}{tag} = loc("{label}")')
        lines.append(f'{indent}{result} = "top.A16MatMul"({x}, %q{tag}, %s{tag}, %z{tag}, {bias}) '
                     f'{{q_group_size = {group} : i64, right_transpose = true, weight_bits = {bits} : i64}} : '
                     f'({tx}, {types["q"]}, {types["s"]}, {types["z"]}, {tb}) -> {to} loc({loc})')
        done.append(name)
    if done:
        np.savez(weight_file, **arrays)
        mlir.write_text("\n".join(lines + new_locs) + "\n")
    return done
