"""What a pass is, how passes find constants and neighbours, and the parity check each pass must keep."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class GraphPass:
    """Rewrites an onnx-graphsurgeon graph in place; returns how many sites it rewrote."""

    name: str
    summary: str
    fn: Callable[..., int]
    min_opset: int = 0  # opset the rewritten graph needs (e.g. 23 for RMSNormalization)


@dataclass(frozen=True)
class ModelPass:
    """Rewrites a whole ModelProto (opset conversion, onnxslim); returns (model, sites)."""

    name: str
    summary: str
    fn: Callable[..., tuple[onnx.ModelProto, int]]
    min_opset: int = 0


PASSES: dict[str, GraphPass | ModelPass] = {}


def register(p: GraphPass | ModelPass) -> GraphPass | ModelPass:
    PASSES[p.name] = p
    return p


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version


def run_pass(model: onnx.ModelProto, p: GraphPass | ModelPass, **options: object) -> tuple[onnx.ModelProto, int]:
    """Apply one pass; a pass that finds nothing returns the model unchanged."""
    if isinstance(p, ModelPass):
        return p.fn(model, **options)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = gs.import_onnx(inferred)
    sites = p.fn(graph, **options)
    if not sites:
        return model, 0
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    if p.min_opset and opset_of(out) < p.min_opset:
        set_opset(out, p.min_opset)
        out.ir_version = max(out.ir_version, 10)
    # drop intermediate shapes: some passes change them, and the next inference recomputes all
    del out.graph.value_info[:]
    return out, sites


# --- small helpers the passes share -------------------------------------------------------------

def np_dtype(dtype: object) -> np.dtype | None:
    """A tensor's dtype as numpy's, or None when unknown or numpy has none (bfloat16 arrives as an enum)."""
    try:
        return None if dtype is None else np.dtype(dtype)
    except TypeError:
        return None


def const(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return t.values
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        return value.values if isinstance(value, gs.Constant) else None
    return None


def producer(t: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
    """The node that makes `t` if it is of type `op`."""
    ops = (op,) if isinstance(op, str) else op
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op in ops:
        return t.inputs[0]
    return None


def only_consumer(t: gs.Tensor, op: str) -> gs.Node | None:
    if len(t.outputs) == 1 and t.outputs[0].op == op:
        return t.outputs[0]
    return None


def scalar(t: gs.Tensor) -> float | None:
    value = const(t)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def reduce_axes(node: gs.Node) -> list[int] | None:
    """Axes of a Reduce* node, from its attribute (opset <= 17) or its second input (18+)."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1:
        value = const(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return None

