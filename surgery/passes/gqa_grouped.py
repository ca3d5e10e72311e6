"""GQA without the copy: decode attention that repeats K/V per query group (Unsqueeze -> Expand ->
Reshape, for K and V) becomes a grouped attention: the one-token query is reshaped to
[1, kv_heads, groups, head_dim] and multiplied with the shared K/V directly.

Only decode graphs (one query token) are rewritten: there the mask [1, 1, 1, T] broadcasts over the
groups unchanged, so the softmax chain in between needs no edit.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, const, only_consumer, producer, register

ELEMENTWISE = {"Mul", "Div", "Add", "Sub", "Cast"}


def _repeated(t: gs.Tensor) -> gs.Tensor | None:
    """If `t` is repeat_kv(x) = Reshape(Expand(Unsqueeze(x, axis 2))), return x ([1, kv, T, D])."""
    reshape = producer(t, "Reshape")
    expand = reshape and producer(reshape.inputs[0], "Expand")
    unsq = expand and producer(expand.inputs[0], "Unsqueeze")
    if unsq is None:
        return None
    axes = const(unsq.inputs[1]) if len(unsq.inputs) > 1 else np.array(unsq.attrs.get("axes", []))
    return unsq.inputs[0] if axes is not None and list(axes.reshape(-1)) == [2] else None


def _broadcasts_over_groups(t: gs.Tensor) -> bool:
    """An operand that is a scalar or has size 1 on the head and query axes."""
    shape = t.shape if t.shape is not None else (const(t).shape if const(t) is not None else None)
    if shape is None:
        return False
    return len(shape) == 0 or (len(shape) == 4 and shape[1] == 1 and shape[2] == 1)


def gqa_grouped(graph: gs.Graph) -> int:
    sites = 0
    for scores_mm in [n for n in graph.nodes if n.op == "MatMul"]:
        kt = producer(scores_mm.inputs[1], "Transpose")
        q = scores_mm.inputs[0]
        k = kt and _repeated(kt.inputs[0])
        if k is None or list(kt.attrs.get("perm", [])) != [0, 1, 3, 2] or q.shape is None or k.shape is None:
            continue
        _, heads, s, d = q.shape
        kv = k.shape[1]
        if s != 1 or not isinstance(heads, int) or not isinstance(kv, int) or heads == kv:
            continue
        chain, t = [], scores_mm.outputs[0]
        while (nxt := t.outputs[0] if len(t.outputs) == 1 else None) is not None and nxt.op in ELEMENTWISE:
            other = [x for x in nxt.inputs if x is not t]
            if not all(_broadcasts_over_groups(x) for x in other):
                break
            chain.append(nxt)
            t = nxt.outputs[0]
        softmax = only_consumer(t, "Softmax")
        if softmax is None or softmax.attrs.get("axis", -1) not in (-1, 3):
            continue
        out_mm = only_consumer(softmax.outputs[0], "MatMul")
        v = out_mm and _repeated(out_mm.inputs[1])
        if v is None or out_mm.inputs[0] is not softmax.outputs[0]:
            continue
        groups = heads // kv
        name = scores_mm.name
        qg = gs.Variable(f"{name}_q_grouped", dtype=q.dtype)
        graph.nodes.append(gs.Node("Reshape", f"{name}_group_q", inputs=[
            q, gs.Constant(f"{name}_q_shape", np.array([1, kv, groups, d], np.int64))], outputs=[qg]))
        kt.inputs = [k]
        scores_mm.inputs = [qg, kt.outputs[0]]
        for tensor in [scores_mm.outputs[0], *(n.outputs[0] for n in chain), softmax.outputs[0]]:
            tensor.shape = None
        out = out_mm.outputs[0]
        grouped = gs.Variable(f"{name}_out_grouped", dtype=out.dtype)
        out_mm.inputs = [softmax.outputs[0], v]
        out_mm.outputs = [grouped]
        graph.nodes.append(gs.Node("Reshape", f"{name}_ungroup", inputs=[
            grouped, gs.Constant(f"{name}_out_shape", np.array([1, heads, 1, d], np.int64))], outputs=[out]))
        sites += 1
    return sites


PASS = register(GraphPass("gqa_grouped", "decode GQA: grouped query x shared K/V instead of repeat_kv copies",
                          gqa_grouped))
