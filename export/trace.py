"""One export job -> one ONNX graph, with weights written once, straight from torch memory.

The TorchScript exporter serializes, constant-folds and copies every weight several times (24 s for a
Qwen-7B block, most of it weight handling). So the wrapper is traced with its parameters passed as graph
inputs (3 s), and the weights are attached afterwards as initializers: inline for small graphs, in
`<graph>.onnx.data` for large ones. The one fold the exporter would have done on weights, `Transpose` of
a Linear weight, is done here while writing. Vocabulary tables are traced with a few-row stand-in and point
at their shared table file (export/tables.py), so no table is ever in memory whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from surgery.errors import SurgeryError
from surgery.export.jobs import Job
from surgery.export.tables import Table, standin
from surgery.fsutil import STAGING_PREFIX
from surgery.manifest import TensorSpec
from surgery.onnxio import DataWriter, data_file, external_tensor, inline_tensor, save_graph, tensor_dtype

ONNX_TO_NUMPY = {onnx.TensorProto.BFLOAT16: "bfloat16"}


class ParamsAsInputs(torch.nn.Module):
    """Calls `module` with the named parameters taken from trailing inputs, so the exporter sees them as
    graph inputs and never copies them."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.slots = [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in names]

    def forward(self, *args: torch.Tensor):
        n = len(args) - len(self.slots)
        saved = [owner._parameters[leaf] for owner, leaf in self.slots]
        try:
            for (owner, leaf), tensor in zip(self.slots, args[n:], strict=True):
                owner._parameters[leaf] = tensor  # a plain tensor for the trace; restored below
            return self.module(*args[:n])
        finally:
            for (owner, leaf), param in zip(self.slots, saved, strict=True):
                owner._parameters[leaf] = param


def unique_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by name, a tensor shared by two modules once (its first name)."""
    seen: set[int] = set()
    out = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if name in n.input]


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm in (None, [1, 0])


def _rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _drop(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    ids = {id(n) for n in nodes}
    kept = [n for n in graph.node if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(kept)


def _head_as_gemm(graph: onnx.GraphProto, table: str) -> bool:
    """`MatMul(x, Transpose(W))` with a 2-D `x` -> `Gemm(x, W, transB=1)`, so the table keeps its [V, H]
    layout (the one the embedding uses) and is never transposed in memory."""
    users = _consumers(graph, table)
    if len(users) != 1 or not _is_transpose_2d(users[0]):
        return False
    transposed = users[0].output[0]
    matmuls = _consumers(graph, transposed)
    if len(matmuls) != 1 or matmuls[0].op_type != "MatMul" or matmuls[0].input[1] != transposed:
        return False
    mm = matmuls[0]
    gemm = onnx.helper.make_node("Gemm", [mm.input[0], table], list(mm.output), name=mm.name or "head_gemm",
                                 transB=1)
    at = list(graph.node).index(mm)
    _drop(graph, [users[0], mm])
    graph.node.insert(at - 1, gemm)
    return True


def _cast_table(graph: onnx.GraphProto, table: str, to: int) -> None:
    """A table stored in another dtype than the graph computes in: `Gather` then `Cast` (only the gathered
    rows are converted), or `Cast` then the product."""
    for node in _consumers(graph, table):
        at = list(graph.node).index(node)
        if node.op_type == "Gather":
            out = node.output[0]
            node.output[0] = f"{out}_stored"
            graph.node.insert(at + 1, onnx.helper.make_node("Cast", [node.output[0]], [out], to=to,
                                                            name=f"{node.name}_cast"))
        else:
            cast = onnx.helper.make_node("Cast", [table], [f"{table}_cast"], to=to, name=f"{table}_cast")
            node.input[list(node.input).index(table)] = cast.output[0]
            graph.node.insert(at, cast)


def _attach_weights(model: onnx.ModelProto, params: dict[str, torch.Tensor], tables: dict[str, Table],
                    data: Path | None) -> None:
    """Graph inputs named after parameters become initializers (transposes of 2-D weights folded)."""
    graph = model.graph
    present = {i.name for i in graph.input}
    initializers: list[onnx.TensorProto] = []
    writer = DataWriter(data) if data is not None else None
    try:
        for name, tensor in params.items():
            if name not in present:
                continue  # the exporter dropped an unused input
            if name in tables:
                table = tables[name]
                if not _consumers(graph, name)[0].op_type == "Gather":
                    _head_as_gemm(graph, name)
                dtype = tensor_dtype(torch.zeros(0, dtype=table.dtype))
                if table.dtype != tensor.dtype:  # stored narrower than the graph computes: cast where it is read
                    _cast_table(graph, name, tensor_dtype(torch.zeros(0, dtype=tensor.dtype)))
                initializers.append(external_tensor(name, dtype, table.shape, table.file, 0, table.nbytes))
                continue
            users = _consumers(graph, name)
            if tensor.dim() == 2 and users and all(_is_transpose_2d(u) for u in users):
                for u in users:
                    _rewire(graph, u.output[0], f"{name}.T")
                _drop(graph, users)
                name, tensor = f"{name}.T", tensor.t()
            initializers.append(writer.add(name, tensor) if writer else inline_tensor(name, tensor.contiguous()))
    finally:
        if writer:
            writer.close()
    kept = [i for i in graph.input if i.name not in params]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(initializers)


def _infer_outputs(model: onnx.ModelProto) -> None:
    """Recompute output shapes after a table's real row count replaced the stand-in's."""
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model)
    for out, new in zip(model.graph.output, inferred.graph.output, strict=True):
        out.type.CopyFrom(new.type)


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    specs = []
    for out in model.graph.output:
        t = out.type.tensor_type
        dtype = ONNX_TO_NUMPY.get(t.elem_type) or str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        specs.append(TensorSpec(out.name, [d.dim_value for d in t.shape.dim], dtype))
    return specs


@contextlib.contextmanager
def _staged(path: Path, keep: set[str] = frozenset()) -> Iterator[tuple[Path, Path]]:
    """A staging directory beside `path`; the caller writes `stage/<graph>` and, if any, `stage/<data>`. On
    success the data file is moved into place before the graph (a stale data file of ours is removed, one
    named in `keep` stays); the staging directory always goes."""
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{path.stem}-", dir=path.parent))
    data = data_file(path)
    try:
        yield stage / path.name, stage / data.name
        if (stage / data.name).exists():
            os.replace(stage / data.name, data)
        elif data.exists() and data.name not in keep:
            data.unlink()  # a previous export's data; a table file of this name stays
        os.replace(stage / path.name, path)
        path.with_name(f"{path.stem}.original.onnx").unlink(missing_ok=True)  # optimize's copy of the old graph
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _trace(module: torch.nn.Module, args: tuple, tmp: Path, names: list[str], outputs: list[str], opset: int,
           dynamo: bool) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(tmp), input_names=names, output_names=outputs, opset_version=opset,
                              dynamo=True, optimize=True, verbose=False)
        else:
            torch.onnx.export(module, args, str(tmp), input_names=names, output_names=outputs, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
    model = onnx.load(str(tmp))
    for extra in tmp.parent.iterdir():  # what the exporter wrote beside the graph is now in `model`
        extra.unlink()
    return model


def export_job(job: Job, path: Path, opset: int, tables: dict[str, Table], external_above: int,
               exporter: str = "torchscript") -> list[TensorSpec]:
    """Export one wrapper to `path` atomically (its data file first); return its output specs."""
    if exporter == "dynamo":
        return _export_dynamo(job, path, opset, external_above)
    params: dict[str, torch.Tensor] = dict(unique_parameters(job.module))
    traced = {name: standin(tables[name], p.dtype) if name in tables else p for name, p in params.items()}
    own_bytes = sum(p.numel() * p.element_size() for name, p in params.items() if name not in tables)
    external = own_bytes > external_above
    if external and tables:
        raise SurgeryError(f"{job.name}: a graph reading a vocabulary table keeps its other weights inline; "
                           f"this one has {own_bytes} bytes of them")
    with _staged(path, keep={t.file for t in tables.values()}) as (tmp, data):
        model = _trace(ParamsAsInputs(job.module, list(params)), (*job.inputs.values(), *traced.values()), tmp,
                       [*job.inputs, *params], job.outputs, opset, dynamo=False)
        _attach_weights(model, params, tables, data if external else None)
        if tables:
            _infer_outputs(model)
        save_graph(model, tmp)
    return output_specs(model)


def _export_dynamo(job: Job, path: Path, opset: int, external_above: int) -> list[TensorSpec]:
    """torch.export-based exporter: weights embedded by the exporter, moved to a data file when large."""
    with _staged(path) as (tmp, data):
        model = _trace(job.module, tuple(job.inputs.values()), tmp, list(job.inputs), job.outputs, opset,
                       dynamo=True)
        if sum(f.ByteSize() for f in model.graph.initializer) > external_above:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            save_graph(model, tmp)
    return output_specs(model)
