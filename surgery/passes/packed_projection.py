"""A packed projection read in parts becomes one projection per part.

Baichuan's `W_pack` (and any fused QKV read the same way) is one MatMul whose output is reshaped to
[..., 3, hidden], moved around by views (Unsqueeze, Transpose, Squeeze) and then picked apart by Gathers
with constant indices. TPU-MLIR 1.30.2 compiles every one of those views in place, so each part is a window
at an offset inside the MatMul's buffer; a decode block deployed with `--addr_mode io_alone` and
`--quant_output` then returns zeros for an output that is such a window (Baichuan2-7B's `past_v`: cosine
0.0 on the simulator; tests/test_compile_sophgo.py reproduces it). Here each Gather becomes its own MatMul
on a Slice of the columns it reads, reshaped to the Gather's output: exact, and once slim or the compiler
folds the Slices, the layout LLM-TPU's own converter writes (separate q, k and v weights). The weight is
sliced in the graph, not here: optimize hands passes sealed weights (graph inputs) and never loads them.

Which columns a Gather reads is not guessed from the view ops' meaning: the chain is replayed in numpy on
an array of element positions, and the rewrite happens only if the result is exactly a column slice of the
MatMul's output.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, register

VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten")


def _const(node: gs.Node, index: int, attr: str) -> list[int] | None:
    """A node's axes/shape operand: its constant input `index`, else its attribute `attr` (older opsets)."""
    if len(node.inputs) > index:
        value = node.inputs[index]
        return [int(v) for v in np.ravel(value.values)] if isinstance(value, gs.Constant) else None
    value = node.attrs.get(attr)
    return None if value is None else [int(v) for v in np.ravel(value)]


def replay(node: gs.Node, x: np.ndarray) -> np.ndarray | None:
    """What `node` does to `x` (its data input), or None when the node's operands are not constants."""
    if node.op == "Reshape":
        shape = _const(node, 1, "shape")
        if shape is None or node.attrs.get("allowzero", 0):
            return None
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
    if node.op == "Squeeze":
        if len(node.inputs) < 2 and "axes" not in node.attrs:
            return np.squeeze(x)
        axes = _const(node, 1, "axes")
        return None if axes is None else np.squeeze(x, axis=tuple(axes))
    if node.op == "Unsqueeze":
        axes = _const(node, 1, "axes")
        if axes is None:
            return None
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(a % rank for a in axes)))
    if node.op == "Transpose":
        return np.transpose(x, node.attrs.get("perm"))
    if node.op == "Flatten":
        axis = node.attrs.get("axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if node.op == "Gather" and isinstance(node.inputs[1], gs.Constant):
        return np.take(x, node.inputs[1].values.astype(np.int64), axis=node.attrs.get("axis", 0))
    return None


def _reads(tensor: gs.Tensor, positions: np.ndarray, graph: gs.Graph) -> list[tuple[gs.Node, np.ndarray]] | None:
    """Every Gather reached from `tensor` through views, with the positions it reads; None if `tensor` or a
    view on the way is read any other way (a graph output, another op, an operand that is not constant)."""
    if tensor in graph.outputs or not tensor.outputs:
        return None
    found = []
    for node in tensor.outputs:
        if node.inputs[0] is not tensor or node.op not in (*VIEWS, "Gather"):
            return None
        try:
            moved = replay(node, positions)
        except ValueError:  # operands that do not fit the positions: not a view of this output
            return None
        if moved is None:
            return None
        if node.op == "Gather":
            found.append((node, moved))
            continue
        deeper = _reads(node.outputs[0], moved, graph)
        if deeper is None:
            return None
        found += deeper
    return found


def packed_projection(graph: gs.Graph) -> int:
    sites = 0
    for matmul in [n for n in graph.nodes if n.op == "MatMul"]:
        weight, out = matmul.inputs[1], matmul.outputs[0]
        # a weight: a constant, or (surgery/optimize.py seals external weights) a graph input
        if not (isinstance(weight, gs.Constant) or weight in graph.inputs) or len(weight.shape or ()) != 2 \
                or not isinstance(weight.shape[1], int) or len(out.outputs) != 1:
            continue
        first = out.outputs[0]  # a Reshape to a constant shape says how many elements the output has
        shape = _const(first, 1, "shape") if first.op == "Reshape" else None
        if shape is None or min(shape) < 1 or shape[-1] > weight.shape[1]:  # (_reads refuses graph outputs)
            continue
        columns = weight.shape[1]
        total = int(np.prod(shape))
        if total % columns:
            continue
        positions = np.arange(total).reshape(-1, columns)  # the MatMul's output: rows x columns
        reads = _reads(out, positions, graph)
        plans = []
        for gather, picked in reads or []:
            start, width = int(picked.flat[0] % columns), picked.size // positions.shape[0]
            if not width or start + width > columns or picked.size % positions.shape[0] or \
                    not np.array_equal(positions[:, start:start + width].reshape(picked.shape), picked):
                plans = []
                break
            plans.append((gather, start, width, picked.shape))
        if len(plans) < 2:
            continue
        for gather, start, width, picked_shape in plans:
            name = gather.outputs[0].name
            part = gs.Variable(f"{name}_weight", dtype=weight.dtype)  # the columns, folded by slim / the compiler
            cut = [gs.Constant(f"{name}_{k}", np.array([v], dtype=np.int64))
                   for k, v in (("starts", start), ("ends", start + width), ("axes", 1))]
            product = gs.Variable(f"{name}_projection", dtype=out.dtype)
            target = gs.Constant(f"{name}_shape", np.array(picked_shape, dtype=np.int64))
            result = gather.outputs[0]
            gather.outputs = []
            graph.nodes += [gs.Node("Slice", inputs=[weight, *cut], outputs=[part]),
                            gs.Node("MatMul", inputs=[matmul.inputs[0], part], outputs=[product]),
                            gs.Node("Reshape", inputs=[product, target], outputs=[result])]
        sites += 1
    return sites


PASS = register(GraphPass("packed_projection", "a packed projection (fused QKV) picked apart by Gathers -> one "
                          "MatMul per part on its columns (TPU-MLIR returns zeros for in-place windows)",
                          packed_projection))
