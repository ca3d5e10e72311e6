"""Casts that change nothing: Cast to the input's own type, and a round trip through a wider type."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, np_dtype, producer, register
from surgery.passes.transpose_pairs import bypass


def _dtype(to: int) -> np.dtype | None:
    """numpy's dtype for an ONNX type; None for types numpy lacks (bfloat16, whose casts are never no-ops here)."""
    if to == onnx.TensorProto.BFLOAT16:
        return None
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))


def _widens(src: np.dtype, mid: np.dtype) -> bool:
    """Whether every value of `src` survives a trip through `mid`."""
    if src.kind == "f" and mid.kind == "f":
        return mid.itemsize >= src.itemsize
    if src.kind in "iu" and mid.kind in "iu":
        return mid.itemsize > src.itemsize or (mid.itemsize == src.itemsize and mid.kind == src.kind)
    return src.kind in "iu" and mid.kind == "f" and mid.itemsize > src.itemsize * 2


def cast_pairs(graph: gs.Graph) -> int:
    sites = 0
    for cast in [n for n in graph.nodes if n.op == "Cast"]:
        x = cast.inputs[0]
        to = _dtype(cast.attrs["to"])
        if to is None:
            continue
        if np_dtype(x.dtype) == to:
            sites += bypass(graph, cast, x)
            continue
        first = producer(x, "Cast")
        src = first.inputs[0] if first is not None else None
        mid = _dtype(first.attrs["to"]) if first is not None else None
        if src is not None and np_dtype(src.dtype) == to and mid is not None and _widens(to, mid):
            sites += bypass(graph, cast, src)
    return sites


PASS = register(GraphPass("cast_pairs", "Cast to the same type, and lossless Cast round trips, removed", cast_pairs))
