"""Transpose of a Transpose becomes one Transpose with the composed permutation, or nothing."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from surgery.passes.base import GraphPass, producer, register


def bypass(graph: gs.Graph, node: gs.Node, source: gs.Tensor) -> bool:
    """Route every consumer of `node`'s output to `source`; graph outputs keep their node."""
    out = node.outputs[0]
    if out in graph.outputs:
        return False
    for consumer in list(out.outputs):
        consumer.inputs = [source if t is out else t for t in consumer.inputs]
    return True


def transpose_pairs(graph: gs.Graph) -> int:
    sites = 0
    for t2 in [n for n in graph.nodes if n.op == "Transpose"]:
        t1 = producer(t2.inputs[0], "Transpose")
        if t1 is None or "perm" not in t1.attrs or "perm" not in t2.attrs:
            continue
        p1, p2 = list(t1.attrs["perm"]), list(t2.attrs["perm"])
        composed = [p1[i] for i in p2]
        if composed == sorted(composed):
            sites += bypass(graph, t2, t1.inputs[0])
        else:
            t2.inputs = [t1.inputs[0]]
            t2.attrs["perm"] = composed
            sites += 1
    for t in [n for n in graph.nodes if n.op == "Transpose"]:
        perm = list(t.attrs.get("perm", []))
        if perm and perm == sorted(perm):  # identity permutation
            sites += bypass(graph, t, t.inputs[0])
    return sites


PASS = register(GraphPass("transpose_pairs", "Transpose(Transpose(x)) -> one Transpose, or x when they cancel",
                          transpose_pairs))
