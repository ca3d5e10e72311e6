"""Move the final norm out of `lm_head` into the last layer's blocks, so `lm_head` is one product with the
vocabulary table: the layout llm_convert emits and LLM-TPU's runtime runs.

A head that is only `Gemm(hidden, table, transB=1)` compiles straight from the table (no ONNX front end,
no transposed copy of a 2.5 GB weight), and for tied models it shares that table byte for byte with the
embedding nets, so `model_tool --combine` stores it once. The runtime is unchanged: it already feeds the
last block's hidden state to `lm_head`. This is a directory pass (it rewrites three graphs together), run
by `surgery optimize` for targets that ask for it, and checked end to end: last block then head, before
and after, on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from surgery.errors import SurgeryError
from surgery.manifest import GraphSpec, Manifest
from surgery.onnxio import load_structure

PREFIX = "final_norm/"


def table_cast(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    """The `Cast` that turns a table stored in bf16/fp16 into the graph's dtype, if `name` is its output."""
    tables = {t.name for t in model.graph.initializer
              if len(t.dims) == 2 and t.data_location == onnx.TensorProto.EXTERNAL}
    return next((n for n in model.graph.node if n.op_type == "Cast" and n.output[0] == name and n.input[0] in tables),
                None)


def table_product(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The head's `Gemm(x, table, transB=1)` on a 2-D external initializer (or its Cast), if it ends the graph."""
    tables = {t.name for t in model.graph.initializer
              if len(t.dims) == 2 and t.data_location == onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        reads_table = len(node.input) == 2 and (node.input[1] in tables or table_cast(model, node.input[1]))
        if node.op_type == "Gemm" and reads_table and trans_b == 1 and node.output[0] == model.graph.output[0].name:
            return node
    return None


def _norm_part(head: onnx.ModelProto, gemm: onnx.NodeProto) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes that compute the Gemm's input from the graph input, and the initializers they read."""
    producers = {out: n for n in head.graph.node for out in n.output}
    needed, stack, seen = [], [gemm.input[0]], set()  # the norm: what feeds the product's activation input
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(head.graph.node)}
    needed.sort(key=lambda n: order[id(n)])
    weights = {t.name for t in head.graph.initializer} & {i for n in needed for i in n.input}
    return needed, weights


def _renamed(name: str, hidden_in: str, pre: str, normed: str) -> str:
    if name == hidden_in:
        return pre
    if name == normed:
        return "hidden_states"
    return PREFIX + name if name else name


def append_norm(block: onnx.ModelProto, head: onnx.ModelProto, nodes: list[onnx.NodeProto], weights: set[str],
                normed: str) -> None:
    """Append the head's norm to a block graph's `hidden_states` output, in place."""
    hidden_in = head.graph.input[0].name
    pre = "hidden_states_before_final_norm"
    for node in block.graph.node:
        node.output[:] = [pre if o == "hidden_states" else o for o in node.output]
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = PREFIX + node.name
        copy.input[:] = [_renamed(i, hidden_in, pre, normed) for i in node.input]
        copy.output[:] = [_renamed(o, hidden_in, pre, normed) for o in node.output]
        block.graph.node.append(copy)
    for t in head.graph.initializer:
        if t.name in weights:
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = PREFIX + t.name
            block.graph.initializer.append(copy)
    del block.graph.value_info[:]


def head_only(head: onnx.ModelProto, gemm: onnx.NodeProto) -> onnx.ModelProto:
    """The head reduced to its table product, reading the graph input directly."""
    out = onnx.ModelProto()
    out.CopyFrom(head)
    del out.graph.node[:]
    cast = table_cast(head, gemm.input[1])
    if cast is not None:
        out.graph.node.append(cast)
    node = onnx.NodeProto()
    node.CopyFrom(gemm)
    node.input[0] = head.graph.input[0].name
    out.graph.node.append(node)
    keep = [t for t in head.graph.initializer if t.name in (gemm.input[1], cast and cast.input[0])]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    del out.graph.value_info[:]
    return out


def plan(directory: Path, manifest: Manifest) -> dict[str, onnx.ModelProto] | None:
    """The rewritten lm_head and last-layer blocks, or None when the head is not norm + table product
    (nothing to do, or a head this pass does not understand: it is then left whole)."""
    if manifest.conventions.get("final_norm") == "last_block":
        return None
    head_spec = manifest.graph("lm_head")
    head = load_structure(directory / head_spec.file)
    gemm = table_product(head)
    if gemm is None:
        return None
    nodes, weights = _norm_part(head, gemm)
    if not nodes:
        return None
    last = manifest.num_layers - 1
    rewritten = {"lm_head": head_only(head, gemm)}
    for g in manifest.graphs:
        if g.layer == last and g.kind in ("block", "block_cache"):
            block = load_structure(directory / g.file)
            append_norm(block, head, nodes, weights, gemm.input[0])
            rewritten[g.name] = block
    if len(rewritten) != 3:
        raise SurgeryError(f"the final norm moves into block_{last} and block_cache_{last}; export every layer "
                           "(no --blocks) for this target")
    return rewritten


def last_graphs(manifest: Manifest) -> list[GraphSpec]:
    last = manifest.num_layers - 1
    return [g for g in manifest.graphs if g.name == "lm_head" or (g.layer == last and g.kind != "embedding")]
