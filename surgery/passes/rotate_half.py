"""RoPE's rotate_half (`cat(-x2, x1)` from two halves of x) -> one MatMul with a constant +-1 matrix.

Two shapes of the same thing are matched: two Slices of x (transformers), and Reshape -> Split ->
Squeeze (einops, Qwen-v1 remote code). Four to six small ops become one MatMul an NPU runs well.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, const, producer, register


def rotation(d: int, dtype: np.dtype) -> np.ndarray:
    """R with x @ R == cat(-x[d/2:], x[:d/2])."""
    h = d // 2
    r = np.zeros((d, d), dtype=dtype)
    r[np.arange(h) + h, np.arange(h)] = -1
    r[np.arange(h), np.arange(h) + h] = 1
    return r


def _slice_range(node: gs.Node | None, x: gs.Tensor) -> tuple[int, int] | None:
    if node is None or node.op != "Slice" or node.inputs[0] is not x or x.shape is None:
        return None
    starts, ends = const(node.inputs[1]), const(node.inputs[2])
    axes = const(node.inputs[3]) if len(node.inputs) > 3 else np.array([0])
    steps = const(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(steps[0]) != 1:
        return None
    d = x.shape[-1]
    if int(axes[0]) not in (-1, len(x.shape) - 1):
        return None
    return int(starts[0]), min(int(ends[0]), d)


def _halves_by_slices(first: gs.Tensor, neg_in: gs.Tensor) -> gs.Tensor | None:
    a, b = producer(first, "Slice"), producer(neg_in, "Slice")
    if a is None or b is None or a.inputs[0] is not b.inputs[0]:
        return None
    x = a.inputs[0]
    if not isinstance(x.shape[-1] if x.shape else None, int):
        return None
    h = x.shape[-1] // 2
    return x if (_slice_range(a, x), _slice_range(b, x)) == ((0, h), (h, x.shape[-1])) else None


def _halves_by_split(first: gs.Tensor, neg_in: gs.Tensor) -> gs.Tensor | None:
    sq0, sq1 = producer(first, "Squeeze"), producer(neg_in, "Squeeze")
    if sq0 is None or sq1 is None:
        return None
    split = producer(sq0.inputs[0], "Split")
    if split is None or producer(sq1.inputs[0], "Split") is not split or len(split.outputs) != 2:
        return None
    if (split.outputs[0], split.outputs[1]) != (sq0.inputs[0], sq1.inputs[0]):
        return None
    reshape = producer(split.inputs[0], "Reshape")
    x = reshape.inputs[0] if reshape is not None else None
    shape = reshape.outputs[0].shape if reshape is not None else None
    if x is None or x.shape is None or shape is None or list(shape[-2:]) != [2, x.shape[-1] // 2]:
        return None
    axis = split.attrs.get("axis", 0)
    return x if axis in (-2, len(shape) - 2) else None


def rotate_half(graph: gs.Graph) -> int:
    sites = 0
    for concat in [n for n in graph.nodes if n.op == "Concat" and len(n.inputs) == 2]:
        neg = producer(concat.inputs[0], "Neg")
        if neg is None:
            continue
        x = _halves_by_slices(concat.inputs[1], neg.inputs[0]) or _halves_by_split(concat.inputs[1], neg.inputs[0])
        if x is None or concat.attrs.get("axis") not in (-1, len(x.shape) - 1):
            continue
        out = concat.outputs[0]
        concat.outputs = []
        r = gs.Constant(f"{concat.name}_rotate_half", rotation(x.shape[-1], np.dtype(x.dtype or np.float32)))
        graph.nodes.append(gs.Node("MatMul", f"{concat.name}_as_matmul", inputs=[x, r], outputs=[out]))
        sites += 1
    return sites


PASS = register(GraphPass("rotate_half", "RoPE rotate_half (slices/split, neg, concat) -> MatMul with a +-1 matrix",
                          rotate_half))
