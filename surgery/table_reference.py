"""Reference outputs of a vocabulary-table graph, computed from its table on disk a slice at a time.

A table graph (`embedding`: a Gather of rows; `lm_head` once the final norm has moved out: a Gemm with the
table) run on onnxruntime holds the whole table in float32 beside its bf16 original: 3.7 GB at Qwen-7B's
shape, in our process while a compiler worker simulates the same graph, for a check that reads one row per
token, or one product per row. From a memory map, 8192 rows at a time, it takes megabytes. Any other graph
(or an attribute this does not model) gets None, and the caller runs onnxruntime as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from surgery.onnxio import load_structure

ROWS = 8192
STORED = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
          onnx.TensorProto.BFLOAT16: np.uint16}


def _rows(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    return np.memmap(base / info["location"], dtype=STORED[tensor.data_type], mode="r",
                     offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def _float(chunk: np.ndarray) -> np.ndarray:
    if chunk.dtype == np.uint16:  # bfloat16 bits
        return (chunk.astype(np.uint32) << 16).view(np.float32)
    return chunk.astype(np.float32)


def table_graph_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """The outputs of a table lookup/product graph at `path` on `feeds`, or None if it is not one."""
    model = load_structure(path)
    tables = {t.name: t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in STORED
              and t.data_location == onnx.TensorProto.EXTERNAL}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in tables}
    rest = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in casts)]
    if len(rest) != 1 or len(model.graph.output) != 1:
        return None
    node, attrs = rest[0], {a.name: onnx.helper.get_attribute_value(a) for a in rest[0].attribute}
    table = tables.get(casts.get(node.input[0] if node.op_type == "Gather" else node.input[-1], ""))
    table = table or tables.get(node.input[0] if node.op_type == "Gather" else node.input[-1])
    if table is None:
        return None
    rows = _rows(table, Path(path).parent)
    if node.op_type == "Gather" and attrs.get("axis", 0) == 0 and node.input[1] in feeds:
        out = _lookup(rows, feeds[node.input[1]])
    elif (node.op_type == "Gemm" and len(node.input) == 2 and attrs.get("transB") == 1 and not attrs.get("transA")
          and attrs.get("alpha", 1.0) == 1.0 and node.input[0] in feeds):
        out = _product(rows, feeds[node.input[0]])
    else:
        return None
    want = onnx.helper.tensor_dtype_to_np_dtype(model.graph.output[0].type.tensor_type.elem_type)
    return [out.astype(want)]


def _lookup(rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids).astype(np.int64)
    return _float(rows[ids.reshape(-1)]).reshape(*ids.shape, rows.shape[1])


def _product(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.concatenate([x @ _float(rows[i:i + ROWS]).T for i in range(0, rows.shape[0], ROWS)], axis=-1)
