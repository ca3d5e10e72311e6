import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgery.passes.testing import apply_checked, ops


def chain(perms: list[list[int]], add_at: int | None = None) -> onnx.ModelProto:
    """x -> Transpose(p) for each p (with an Add after `add_at`) -> y, built by hand (torch folds these)."""
    nodes, last = [], "x"
    for i, perm in enumerate(perms):
        nodes.append(helper.make_node("Transpose", [last], [f"t{i}"], perm=perm))
        last = f"t{i}"
        if i == add_at:
            nodes.append(helper.make_node("Add", [last, "one"], [f"a{i}"]))
            last = f"a{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_transposes_compose_or_cancel():
    model = chain([[0, 2, 1, 3], [0, 2, 1, 3], [0, 2, 1, 3], [0, 1, 3, 2]], add_at=1)
    out, sites = apply_checked(model, "transpose_pairs")
    assert sites == 2 and ops(out) == ["Add", "Transpose"]


def test_graph_output_transpose_is_kept():
    out, sites = apply_checked(chain([[0, 2, 1, 3], [0, 2, 1, 3]]), "transpose_pairs")
    assert sites == 0 and ops(out) == ["Transpose", "Transpose"]
