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
step is its smallest nonzero magnitude (or that divided by a small integer), and the codes are accepted only if
`(code - zero) * scale` gives back every weight bit for bit. Weights not on such a grid stay as they were.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

WEIGHT = re.compile(r'^\s*(%\w+) = "top.Weight"\(\) : \(\) -> (tensor<[^>]*>) loc\((#[\w.]+)\)$', re.M)
LOC = re.compile(r'^(#[\w.]+) = loc\("([^"]*)"\)$', re.M)
MATMUL = re.compile(r'^(\s*)(%\w+) = "top.MatMul"\((%\w+), (%\w+), (%\w+)\) \{[^}]*\} : \((tensor<[^>]*>), '
                    r'(tensor<[^>]*>), ([^)]*)\) -> (tensor<[^>]*>) loc\((#[\w.]+)\)$')
WEIGHT_FILE = re.compile(r'module\.weight_file = "([^"]+)"')


# the hand-over's own version, in every handed-over build's cache key: a change to how the grid is read or the
# MLIR rewritten must not reuse nets built by the old code
HANDOVER_VERSION = 1


def handover_bits(quantize: str, symmetric: bool) -> int | None:
    """The weight bits codes are handed over at: asymmetric W4*/W8* modes (a symmetric compile fixes every
    zero point, which a checkpoint's grid need not have)."""
    return None if symmetric else {"w4": 4, "w8": 8}.get(quantize[:2])


CHUNK = 512  # output rows examined at once: a 7B MLP matrix's temporaries stay tens of MB


def grid_codes(weight: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`weight` [K, N] (a MatMul's right operand) as codes [N, K] uint8, scales [N, K / group] float32 and
    zero points [N, K / group] uint8 with `(code - zero) * scale == weight` exactly, or None."""
    k, n = weight.shape
    if group <= 0 or k % group:
        return None
    codes, scales, zeros = (np.empty((n, k), np.uint8), np.empty((n, k // group), np.float32),
                            np.empty((n, k // group), np.uint8))
    for start in range(0, n, CHUNK):
        rows = np.ascontiguousarray(weight[:, start:start + CHUNK].T, dtype=np.float32)
        found = _grid(rows.reshape(len(rows), k // group, group), (1 << bits) - 1)
        if found is None:
            return None
        codes[start:start + len(rows)], scales[start:start + len(rows)], zeros[start:start + len(rows)] = found
    return codes, scales, zeros


def _grid(w: np.ndarray, maxq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per group (last axis) of float32 `w`: the step s and integer levels with w == level * s exactly. The
    smallest nonzero |w| is s times the smallest nonzero |code - zero|, so s is it or it divided by a small
    integer; a multiple s * m with s a float16 or bfloat16 scale and |m| <= 255 is exact in float32, and so
    is dividing it by s."""
    magnitude = np.abs(w)
    smallest = np.where(magnitude > 0, magnitude, np.inf).min(-1)
    smallest = np.where(np.isfinite(smallest), smallest, 1.0).astype(np.float32)  # an all-zero group
    scale, level = np.zeros_like(smallest), np.zeros_like(w)
    todo = np.ones(smallest.shape, dtype=bool)
    for divisor in range(1, 17):
        idx = np.nonzero(todo)
        if not len(idx[0]):
            break
        step = smallest[idx] / np.float32(divisor)
        t = w[idx] / step[:, None]
        fits = np.all(t == np.round(t), axis=-1) & (t.max(-1) - t.min(-1) <= maxq)
        hit = tuple(i[fits] for i in idx)
        scale[hit], level[hit] = step[fits], np.round(t[fits])
        todo[hit] = False
    if todo.any():
        return None
    zero = np.maximum(0, -level.min(-1))
    if np.any(zero > maxq):
        return None
    codes = level + zero[..., None]
    if not np.array_equal((codes - zero[..., None]) * scale[..., None], w):
        return None
    n = len(w)
    return codes.reshape(n, -1).astype(np.uint8), scale, zero.astype(np.uint8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] codes as A16MatMul's weight: 4 bits two to a byte along K, the even input in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if bits == 4 else codes.astype(np.uint8)


def hand_over(mlir: Path, group: int, bits: int) -> list[str]:
    """Rewrite `mlir` (model_transform's top MLIR) in place and add the codes to its weight file; returns the
    names of the weights handed over as codes. The weight file is read one array at a time and only added to
    (its float weights stay, unused, and do not reach the bmodel)."""
    text = mlir.read_text()
    weight_file = mlir.parent / WEIGHT_FILE.search(text).group(1)
    locs = dict(LOC.findall(text))
    weights = {m.group(1): locs.get(m.group(3)) for m in WEIGHT.finditer(text)}
    lines, new_locs, done, added = [], [], [], {}
    with np.load(weight_file) as stored:
        for line in text.splitlines():
            m = MATMUL.match(line)
            name = weights.get(m.group(4)) if m else None
            found = None
            if name in stored.files:
                array = stored[name]
                found = grid_codes(array, group, bits) if array.ndim == 2 else None
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
                added[label] = array
                kind = "f32" if array.dtype == np.float32 else "ui8"
                types[key] = f"tensor<{'x'.join(map(str, array.shape))}x{kind}>"
                lines.append(f'{indent}%{key}{tag} = "top.Weight"() : () -> {types[key]} loc(#codes_{key}{tag})')
                new_locs.append(f'#codes_{key}{tag} = loc("{label}")')
            lines.append(f'{indent}{result} = "top.A16MatMul"({x}, %q{tag}, %s{tag}, %z{tag}, {bias}) '
                         f'{{q_group_size = {group} : i64, right_transpose = true, weight_bits = {bits} : i64}} : '
                         f'({tx}, {types["q"]}, {types["s"]}, {types["z"]}, {tb}) -> {to} loc({loc})')
            done.append(name)
    if done:
        with zipfile.ZipFile(weight_file, "a") as archive:
            for label, array in added.items():
                with archive.open(f"{label}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array))
        mlir.write_text("\n".join(lines + new_locs) + "\n")
    return done
