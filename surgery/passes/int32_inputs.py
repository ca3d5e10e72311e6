"""int64 graph inputs become int32 (device runtimes feed 32-bit ids and positions), cast back inside."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, np_dtype, register


def int32_inputs(graph: gs.Graph) -> int:
    sites = 0
    for i, x in enumerate(list(graph.inputs)):
        if np_dtype(x.dtype) != np.int64:
            continue
        narrow = gs.Variable(x.name, dtype=np.int32, shape=x.shape)
        x.name = f"{x.name}_int64"
        graph.nodes.append(gs.Node("Cast", f"{narrow.name}_to_int64", {"to": onnx.TensorProto.INT64},
                                   inputs=[narrow], outputs=[x]))
        graph.inputs[i] = narrow
        sites += 1
    return sites


PASS = register(GraphPass("int32_inputs", "int64 graph inputs -> int32 inputs with a Cast inside", int32_inputs))
