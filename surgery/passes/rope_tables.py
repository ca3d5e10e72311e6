"""RoPE computed from position_ids (Cast, MatMul/Mul with inv_freq, Concat, Cos/Sin) becomes a constant
cos/sin table gathered by position_ids, as NPUs want it. Our own exports already emit RoPE this way; this
pass is for graphs exported by other tools.

The table is evaluated on onnxruntime for every position the graph can see: the attention mask's last axis
when the graph has one (decode: SEQ + 1 slots), else the graph's own sequence length.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from surgery.passes.base import GraphPass, np_dtype, register


def _graph_inputs_behind(t: gs.Tensor, seen: set[int] | None = None) -> set[str] | None:
    """Names of the graph inputs `t` depends on; None if it depends on anything but inputs and constants."""
    seen = set() if seen is None else seen
    if id(t) in seen or isinstance(t, gs.Constant):
        return set()
    seen.add(id(t))
    if not t.inputs:
        return {t.name}
    found: set[str] = set()
    for node in t.inputs:
        for x in node.inputs:
            got = _graph_inputs_behind(x, seen)
            if got is None:
                return None
            found |= got
    return found


def _positions(graph: gs.Graph, pos: gs.Variable) -> int:
    mask = next((t for t in graph.inputs if "mask" in t.name and t.shape), None)
    return int(mask.shape[-1]) if mask is not None else int(pos.shape[-1])


def rope_tables(graph: gs.Graph) -> int:
    pos = next((t for t in graph.inputs if "position" in t.name and t.dtype is not None
                and np_dtype(t.dtype) is not None and np.issubdtype(np_dtype(t.dtype), np.integer)
                and t.shape and len(t.shape) == 2), None)
    if pos is None or not isinstance(pos.shape[-1], int):
        return 0
    targets = [n.outputs[0] for n in graph.nodes if n.op in ("Cos", "Sin")
               and _graph_inputs_behind(n.outputs[0]) == {pos.name}
               and n.outputs[0].shape is not None and list(n.outputs[0].shape[:2]) == list(pos.shape)]
    if not targets:
        return 0
    model = gs.export_onnx(graph.copy())
    model.ir_version = min(model.ir_version, 10)
    sub = onnx.utils.Extractor(model).extract_model([pos.name], [t.name for t in targets])
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    s, n = pos.shape[-1], _positions(graph, pos)
    rows: list[list[np.ndarray]] = [[] for _ in targets]
    for start in range(0, n, s):
        ids = np.arange(start, start + s, dtype=np.dtype(pos.dtype))[None]
        for i, value in enumerate(session.run(None, {pos.name: ids})):
            rows[i].append(value[0])
    for i, t in enumerate(targets):
        table = np.concatenate(rows[i])[:n]
        t.inputs[0].outputs = []
        graph.nodes.append(gs.Node("Gather", f"{t.name}_table_gather", {"axis": 0}, inputs=[
            gs.Constant(f"{t.name}_table", np.ascontiguousarray(table)), pos], outputs=[t]))
    return len(targets)


PASS = register(GraphPass("rope_tables", "RoPE cos/sin computed from position_ids -> constant tables gathered by "
                          "position_ids", rope_tables))
