"""RMSNorm: `x * 1/sqrt(mean(x^2) + eps) [* w]` as one opset-23 RMSNormalization (fused), or, for
compilers that stop at opset 17, the same decomposition with Mul(x, x) for Pow and Reciprocal for 1/."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, const, only_consumer, producer, reduce_axes, register, scalar


def _match(rm: gs.Node) -> dict | None:
    """From a ReduceMean, the pieces of one RMSNorm, or None."""
    square = producer(rm.inputs[0], ("Pow", "Mul"))
    if square is None:
        return None
    x = square.inputs[0]
    if square.op == "Pow" and scalar(square.inputs[1]) != 2.0 or square.op == "Mul" and square.inputs[1] is not x:
        return None
    if x.shape is None or reduce_axes(rm) not in ([-1], [len(x.shape) - 1]) or not rm.attrs.get("keepdims", 1):
        return None
    add = only_consumer(rm.outputs[0], "Add")
    sqrt = add and only_consumer(add.outputs[0], "Sqrt")
    eps = add and scalar(add.inputs[1])
    if sqrt is None or eps is None:
        return None
    inv = sqrt.outputs[0].outputs[0] if len(sqrt.outputs[0].outputs) == 1 else None
    if inv is not None and inv.op == "Div" and scalar(inv.inputs[0]) == 1.0:
        mul = only_consumer(inv.outputs[0], "Mul")
        ok = mul is not None and x in mul.inputs
    elif inv is not None and inv.op == "Reciprocal":
        mul = only_consumer(inv.outputs[0], "Mul")
        ok = mul is not None and x in mul.inputs
    elif inv is not None and inv.op == "Div" and inv.inputs[0] is x:
        mul, ok = inv, True
    else:
        return None
    if not ok:
        return None
    last, weight = mul, None
    scale = only_consumer(mul.outputs[0], "Mul")
    if scale is not None:
        other = scale.inputs[1] if scale.inputs[0] is mul.outputs[0] else scale.inputs[0]
        value = const(other)
        if value is not None and value.shape == (x.shape[-1],):
            last, weight = scale, value
    return {"x": x, "eps": eps, "square": square, "inv": inv, "mul": mul, "last": last, "weight": weight,
            "rm": rm, "add": add, "sqrt": sqrt}


def rmsnorm(graph: gs.Graph, fused: bool = True) -> int:
    sites = 0
    for rm in [n for n in graph.nodes if n.op == "ReduceMean"]:
        found = _match(rm)
        if found is None:
            continue
        x, out = found["x"], found["last"].outputs[0]
        if fused:
            dtype = x.dtype or np.float32
            weight = found["weight"] if found["weight"] is not None else np.ones(x.shape[-1], dtype)
            scale = gs.Constant(f"{rm.name}_rms_scale", np.asarray(weight, dtype=dtype))
            found["last"].outputs = []
            graph.nodes.append(gs.Node("RMSNormalization", f"{rm.name}_rms", {"axis": -1, "epsilon": found["eps"]},
                                       inputs=[x, scale], outputs=[out]))
            sites += 1
            continue
        changed = False
        if found["square"].op == "Pow":
            found["square"].op, found["square"].inputs = "Mul", [x, x]
            changed = True
        inv = found["inv"]
        if inv.op == "Div" and inv.inputs[0] is not x:
            inv.op, inv.inputs = "Reciprocal", [found["sqrt"].outputs[0]]
            changed = True
        sites += changed
    return sites


FUSED = register(GraphPass("rmsnorm", "RMSNorm subgraph -> one RMSNormalization (raises the opset to 23)",
                           partial(rmsnorm, fused=True), min_opset=23))
DECOMPOSED = register(GraphPass("rmsnorm17", "RMSNorm kept at opset 17: Mul(x, x) for Pow, Reciprocal for 1/x",
                                partial(rmsnorm, fused=False)))
