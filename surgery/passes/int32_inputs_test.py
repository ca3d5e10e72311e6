import onnx
import torch

from surgery.passes.testing import apply_checked, export


def test_int64_ids_become_int32():
    model = export(torch.nn.Embedding(8, 4), torch.zeros(1, 3, dtype=torch.int64))
    out, sites = apply_checked(model, "int32_inputs")
    assert sites == 1 and out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert out.graph.input[0].name == model.graph.input[0].name
