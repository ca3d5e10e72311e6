"""Down-convert a graph to opset 17 for compilers that reject newer ones.

From opset 18 the Reduce* ops take `axes` as an input (opset 17 wants the attribute and has no
`noop_with_empty_axes`) and Split may carry `num_outputs` (17 splits equally by output count). Ops that
opset 17 does not know, or anything else the checker rejects, are refused by name.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import defs

from surgery.errors import SurgeryError
from surgery.passes.base import ModelPass, const, opset_of, register, set_opset

REDUCE_AXES_INPUT_SINCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def to_opset17(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    if opset_of(model) <= 17:
        return model, 0
    graph = gs.import_onnx(model)
    sites = 0
    for node in graph.nodes:
        try:
            defs.get_schema(node.op, 17, node.domain or "")
        except defs.SchemaError:
            raise SurgeryError(f"graph {graph.name or '?'} uses {node.op}, which opset 17 does not have; "
                               "skip the pass that introduced it or target a newer opset") from None
        if node.op in REDUCE_AXES_INPUT_SINCE_18 and len(node.inputs) > 1:
            axes = const(node.inputs[1])
            if axes is None:
                raise SurgeryError(f"{node.name}: {node.op} with computed axes cannot be expressed in opset 17")
            node.attrs["axes"] = [int(a) for a in axes.reshape(-1)]
            node.inputs = node.inputs[:1]
            node.attrs.pop("noop_with_empty_axes", None)
            sites += 1
        if node.op == "Split" and "num_outputs" in node.attrs:  # 13-17 split equally by output count
            del node.attrs["num_outputs"]
            sites += 1
    graph.cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    set_opset(out, 17)
    out.ir_version = 8
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SurgeryError(f"cannot express graph {graph.name or '?'} in opset 17: {first}") from None
    return out, sites + 1


PASS = register(ModelPass("opset17", "down-convert to opset 17 (Reduce* axes back to attributes)", to_opset17))
