"""ONNX graphs on disk whose weights live in external data files, shared by export and optimize.

At real sizes the weights are most of every graph (a Qwen-7B block is 800 MB in fp32, its vocabulary table
2.5 GB) and protobuf cannot hold a message over 2 GB. So weights are written once, straight from memory,
into a data file beside the graph; later stages load only the graph structure, `seal` the external
weights into plain graph inputs while passes and shape inference run, and `unseal` them afterwards: the
rewritten graph points at the same bytes, which are never read, copied or re-serialized.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from surgery.errors import SurgeryError

EXTERNAL_DATA_ABOVE = 4 << 20  # bytes of weights above which a graph keeps them in <graph>.onnx.data (every
# block of a real model: later stages then never load, copy or re-serialize them)
CHUNK = 64 << 20  # bytes made contiguous at once when writing a large 2-D tensor
ALIGN = 64  # byte alignment of each tensor in a data file (lets runtimes map tensors in place)


def data_file(path: Path) -> Path:
    """Where a graph's own weights go when they are stored outside the .onnx file."""
    return path.with_name(path.name + ".data")


def tensor_dtype(tensor: torch.Tensor | np.ndarray) -> int:
    if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.bfloat16:
        return onnx.TensorProto.BFLOAT16
    array = tensor.detach().numpy() if isinstance(tensor, torch.Tensor) else tensor
    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)


def raw_bytes(tensor: torch.Tensor | np.ndarray) -> memoryview:
    """The little-endian bytes of a tensor without a copy when it is already contiguous."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().contiguous()
        array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    else:
        array = np.ascontiguousarray(tensor)
    return memoryview(array).cast("B")


def external_tensor(name: str, dtype: int, dims: Iterable[int], location: str, offset: int,
                    length: int) -> onnx.TensorProto:
    """An initializer whose bytes are at `offset` in `location` (relative to the graph's directory)."""
    init = onnx.TensorProto(name=name, data_type=dtype, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return init


def inline_tensor(name: str, tensor: torch.Tensor | np.ndarray) -> onnx.TensorProto:
    return onnx.TensorProto(name=name, data_type=tensor_dtype(tensor), dims=list(tensor.shape),
                            raw_data=bytes(raw_bytes(tensor)))


class DataWriter:
    """Appends tensors to one data file (aligned) and hands back initializers that point at them."""

    def __init__(self, path: Path, location: str | None = None) -> None:
        self.path, self.location = path, location or path.name
        self.fh = open(path, "wb")
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor | np.ndarray) -> onnx.TensorProto:
        pad = -self.offset % ALIGN
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        # a large transposed weight (a vocabulary head folded to [H, V]) is made contiguous a block of rows at
        # a time: a whole contiguous copy would double the biggest tensor an export holds
        total = tensor.nbytes if isinstance(tensor, np.ndarray) else tensor.numel() * tensor.element_size()
        step = max(1, CHUNK * tensor.shape[0] // total) if tensor.ndim == 2 and total > CHUNK else 0
        start, nbytes = self.offset, 0
        for rows in ([tensor[i:i + step] for i in range(0, tensor.shape[0], step)] if step else [tensor]):
            data = raw_bytes(rows)
            self.fh.write(data)
            nbytes += data.nbytes
        self.offset += nbytes
        return external_tensor(name, tensor_dtype(tensor), tensor.shape, self.location, start, nbytes)

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> DataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def external_locations(model: onnx.ModelProto) -> set[str]:
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def load_structure(path: Path) -> onnx.ModelProto:
    """A graph without its external weights (they stay on disk), with one-line errors for bad files."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise SurgeryError(f"{path} is missing; re-run the stage that writes it") from None
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise SurgeryError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); re-run the stage "
                           "that writes it") from None


@dataclass
class Sealed:
    """External initializers taken out of a graph while passes run, keyed by name."""

    tensors: dict[str, onnx.TensorProto]


def seal(model: onnx.ModelProto) -> Sealed:
    """Turn every external-data initializer into a graph input of the same name, type and shape, in place.

    Passes then see a small graph (shape inference and onnxslim serialize it whole) and treat the weights
    as opaque tensors, which is all they ever need of a weight they do not rewrite."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    sealed = {t.name: t for t in model.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type in floats}
    if not sealed:
        return Sealed({})
    kept = [t for t in model.graph.initializer if t.name not in sealed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for t in sealed.values():
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return Sealed(sealed)


def unseal(model: onnx.ModelProto, sealed: Sealed) -> None:
    """Put sealed initializers back (those the graph still uses) and drop their stand-in inputs, in place."""
    if not sealed.tensors:
        return
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    used |= _subgraph_inputs(model.graph)
    inputs = [i for i in model.graph.input if i.name not in sealed.tensors]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for name, t in sealed.tensors.items() if name in used)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= {n for inner in sub.node for n in inner.input} | _subgraph_inputs(sub)
    return names


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph whose big weights are already external (or inline and small), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights, inline or external, without reading external data."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += t.ByteSize()
    return total


def externalize(model: onnx.ModelProto, data: Path, location: str | None = None) -> None:
    """Move the inline initializers of `model` into the data file `data` (written fresh), in place."""
    with DataWriter(data, location) as writer:
        moved = []
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                moved.append(t)
                continue
            moved.append(writer.add(t.name, onnx.numpy_helper.to_array(t)) if t.data_type != onnx.TensorProto.BFLOAT16
                         else _bf16_external(writer, t))
    del model.graph.initializer[:]
    model.graph.initializer.extend(moved)


def _bf16_external(writer: DataWriter, t: onnx.TensorProto) -> onnx.TensorProto:
    array = np.frombuffer(t.raw_data, dtype="<u2").reshape(list(t.dims)) if t.raw_data else \
        np.asarray(t.int32_data, dtype=np.uint16).reshape(list(t.dims))
    init = writer.add(t.name, array)
    init.data_type = onnx.TensorProto.BFLOAT16
    return init


def rename_locations(model: onnx.ModelProto, renames: Mapping[str, str]) -> None:
    """Point external initializers at other data files (e.g. from a temp name to the final one)."""
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value in renames:
                entry.value = renames[entry.value]


LOOKUP_OPS = {"Gather", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity"}  # a plain row lookup


def table_of(path: Path) -> np.ndarray:
    """The 2-D weight a graph gathers from (its vocabulary table), memory-mapped when it is external, as a
    numpy array (bfloat16 comes back as its uint16 bit patterns)."""
    model = load_structure(path)
    extra = [n.op_type for n in model.graph.node if n.op_type not in LOOKUP_OPS]
    if extra:  # e.g. MiniCPM's scale_emb: the rows alone are not the embedding
        raise SurgeryError(f"{path.name} does more than look rows up ({', '.join(sorted(set(extra)))}), so its "
                           "table alone is not the embedding; use a chip whose runtime runs the embedding graph")
    gather = next((n for n in model.graph.node if n.op_type == "Gather"), None)
    init = next((t for t in model.graph.initializer if gather is not None and t.name == gather.input[0]), None)
    if init is None or len(init.dims) != 2:
        raise SurgeryError(f"{path} gathers from no 2-D initializer; is it an embedding graph?")
    dtype = np.dtype("<u2") if init.data_type == onnx.TensorProto.BFLOAT16 else \
        onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(init) if dtype != np.dtype("<u2") else \
            np.frombuffer(init.raw_data, dtype).reshape(list(init.dims))
    info = {e.key: e.value for e in init.external_data}
    return np.memmap(path.parent / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(init.dims))


def write_bf16_rows(table: np.ndarray, path: Path, rows: int = 4096) -> None:
    """A float table (or bf16 bit patterns) as raw little-endian bf16, rounded to nearest even, written
    chunk by chunk and atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        for start in range(0, table.shape[0], rows):
            chunk = np.asarray(table[start:start + rows])
            if chunk.dtype != np.dtype("<u2"):
                chunk = torch.from_numpy(chunk.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
            fh.write(chunk.astype("<u2").tobytes())
    os.replace(tmp, path)


def ort_session(path: Path, prepack: bool = False):
    """An onnxruntime CPU session for `path`. Without prepacking (the default, for one-shot checks) external
    weights are memory-mapped instead of copied into packed buffers: a 2.5 GB head loads in milliseconds
    and costs no extra copy; runtimes that run a graph many times pass prepack=True."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # a one-shot check may run beside compiler workers (the compile stage's checks, while they simulate):
        # threads that spin between ops take the cores those need; waiting threads sleep instead
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_once(path: Path, feeds: dict) -> list:
    """Run `path` once on onnxruntime and release everything it loaded. The outputs are copied: an array
    onnxruntime returns is a view that keeps the session's buffers alive, which for a 7B head is the whole
    fp32 table (2.5 GB) held for as long as the logits are."""
    import numpy as np

    session = ort_session(path)
    try:
        return [np.array(out, copy=True) for out in session.run(None, feeds)]
    finally:
        del session
