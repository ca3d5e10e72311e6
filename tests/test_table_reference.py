"""Table graphs' reference outputs from the table on disk equal onnxruntime's (export/tables.py's layouts:
bf16 tables read through a Cast, fp32 tables read directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from surgery.onnxio import run_once
from surgery.table_reference import table_graph_outputs

VOCAB, HIDDEN = 20000, 48  # more rows than one slice


def _graph(tmp_path: Path, op: str, stored: int, extra: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    if stored == TensorProto.BFLOAT16:
        raw = (table.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        raw = table.tobytes()
    (tmp_path / "t.data").write_bytes(b"\0" * 64 + raw)  # at an offset, as a shared table file has
    init = onnx.TensorProto(name="table", data_type=stored, dims=[VOCAB, HIDDEN])
    init.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "t.data", "offset": "64", "length": str(len(raw))}.items():
        init.external_data.add(key=k, value=v)
    nodes, src = [], "table"
    if stored == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", ["table"], ["table_f"], to=TensorProto.FLOAT))
        src = "table_f"
    if op == "Gather":
        x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 5])
        y = helper.make_tensor_value_info("input_states", TensorProto.FLOAT, [1, 5, HIDDEN])
        nodes.append(helper.make_node("Gather", [src, "input_ids"], ["input_states"], axis=0))
    else:
        x = helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [1, HIDDEN])
        y = helper.make_tensor_value_info("m_logits", TensorProto.FLOAT, [1, VOCAB])
        nodes.append(helper.make_node("Gemm", ["hidden_states", src], ["m_logits"], transB=1, **(extra or {})))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [init]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "g.onnx")
    return tmp_path / "g.onnx"


@pytest.mark.parametrize("stored", [TensorProto.BFLOAT16, TensorProto.FLOAT], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", ["Gather", "Gemm"])
def test_equals_onnxruntime(tmp_path: Path, op: str, stored: int):
    path = _graph(tmp_path, op, stored)
    rng = np.random.default_rng(1)
    feeds = ({"input_ids": rng.integers(0, VOCAB, (1, 5))} if op == "Gather"
             else {"hidden_states": rng.standard_normal((1, HIDDEN)).astype(np.float32)})
    got, want = table_graph_outputs(path, feeds), run_once(path, feeds)
    assert got is not None and got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)


def test_other_graphs_are_left_to_onnxruntime(tmp_path: Path):
    path = _graph(tmp_path, "Gemm", TensorProto.FLOAT, {"alpha": 2.0})  # an attribute this does not model
    assert table_graph_outputs(path, {"hidden_states": np.zeros((1, HIDDEN), np.float32)}) is None
