"""onnxslim cleanup: constant folding, dead nodes, shape folding, common subexpressions."""

from __future__ import annotations

import onnx
import onnxslim

from surgery.passes.base import ModelPass, register


def _structure(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def slim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Sites: nodes removed (at least 1 when it rewrote anything); an unchanged graph comes back as is."""
    out = onnxslim.slim(model)
    if _structure(out) == _structure(model) and len(out.graph.initializer) == len(model.graph.initializer):
        return model, 0
    return out, max(len(model.graph.node) - len(out.graph.node), 1)


PASS = register(ModelPass("slim", "onnxslim: constant/shape folding, dead nodes, common subexpressions", slim))
