"""An ArgMax over the vocabulary gets a vocabulary padded to a multiple of 64 with the lowest float.

TPU-MLIR 1.30.2 cannot generate code for an ArgMax over some last-axis lengths: MiniCPM-2B's 122753 and a
32001 vocabulary fail in codegen (`nodechip_arg_parallel.c: mem_check tensor_size <= limit_size`), while
122754, 122760, 122816, 151655 and 151936 build. The padded entries can never be the largest, and they come
after every real one, so the index of the first largest is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, register

MULTIPLE = 64


def argmax_pad(graph: gs.Graph) -> int:
    sites = 0
    for node in [n for n in graph.nodes if n.op == "ArgMax"]:
        x = node.inputs[0]
        shape = list(x.shape or [])
        axis = node.attrs.get("axis", 0)
        if not shape or axis not in (-1, len(shape) - 1) or not isinstance(shape[-1], int):
            continue
        extra = -shape[-1] % MULTIPLE
        if not extra or np.dtype(x.dtype) not in (np.float32, np.float16):
            continue
        pads = gs.Constant(f"{node.name}_pads", np.array([0] * len(shape) + [0] * (len(shape) - 1) + [extra],
                                                          np.int64))
        lowest = gs.Constant(f"{node.name}_lowest", np.array(np.finfo(np.dtype(x.dtype)).min, np.dtype(x.dtype)))
        padded = gs.Variable(f"{x.name}_padded", dtype=x.dtype, shape=[*shape[:-1], shape[-1] + extra])
        graph.nodes.append(gs.Node("Pad", f"{node.name}_pad", {"mode": "constant"}, inputs=[x, pads, lowest],
                                   outputs=[padded]))
        node.inputs[0] = padded
        sites += 1
    return sites


PASS = register(GraphPass("argmax_pad", f"an ArgMax's last axis padded to a multiple of {MULTIPLE} with the "
                                        "lowest float (TPU-MLIR codegen fails on some lengths)", argmax_pad))
