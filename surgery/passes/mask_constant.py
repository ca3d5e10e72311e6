"""Mask constants below the half-precision range (finfo(float32).min, -1e9, ...) become -10000.

Added to attention scores in fp16/bf16 they overflow to -inf and give NaN after softmax on devices;
-10000 masks just as well (exp(-10000) is 0) and is what the block contract's mask input uses.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgery.manifest import MASK_VALUE
from surgery.passes.base import GraphPass, register

HALF_MIN = -65504.0


def mask_constant(graph: gs.Graph) -> int:
    sites = 0
    tensors = list(graph.tensors().values())
    tensors += [n.attrs["value"] for n in graph.nodes if n.op == "Constant" and isinstance(n.attrs.get("value"),
                                                                                             gs.Constant)]
    for t in tensors:
        if isinstance(t, gs.Constant) and np.issubdtype(t.values.dtype, np.floating) and (t.values < HALF_MIN).any():
            t.values = np.where(t.values < HALF_MIN, MASK_VALUE, t.values).astype(t.values.dtype)
            sites += 1
    return sites


PASS = register(GraphPass("mask_constant", "additive-mask constants below the fp16 range -> -10000", mask_constant))
