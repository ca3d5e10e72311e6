"""One graph's TPU-MLIR build as a self-contained job: what to run, on which inputs, cached by content.

A `GraphJob` names its inputs by path and by sha256 and carries every flag, so it can run on a local
worker or be shipped to another host (compile/executors.py); its cache key is made of content hashes, so
a cache works across hosts and a rerun rebuilds only graphs whose inputs or flags changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from surgery.compile.base import CompileOptions
from surgery.compile.tpumlir import TpuMlirWorker
from surgery.errors import SurgeryError
from surgery.manifest import GraphSpec
from surgery.onnxio import load_structure
from surgery.passes.final_norm import table_product

QUANTS = {"bf16": "BF16", "f16": "F16", "w8bf16": "W8BF16", "w4bf16": "W4BF16", "w8f16": "W8F16", "w4f16": "W4F16"}


def float_mode(quantize: str) -> str:
    return "F16" if quantize.endswith("f16") and not quantize.endswith("bf16") else "BF16"


def deploy_flags(graph: GraphSpec, o: CompileOptions) -> list[str]:
    """The model_deploy flags for one graph, by its kind (the flags the hand-written compile scripts use)."""
    if graph.kind in ("block", "block_cache"):
        flags = ["--quantize", QUANTS[o.quantize], "--quant_input", "--quant_output"]
        if o.quantize.startswith("w"):
            flags += ["--q_group_size", str(o.group_size)] + (["--q_symmetric"] if o.symmetric else [])
        if graph.kind == "block_cache":
            flags += ["--addr_mode", "io_alone"]  # the runtime keeps KV in the decode block's input buffers
    elif graph.kind in ("embedding", "embedding_cache"):
        flags = ["--quantize", float_mode(o.quantize), "--quant_input", "--quant_output"]
    elif graph.kind == "lm_head":
        flags = ["--quantize", float_mode(o.quantize), "--quant_input"]
    elif graph.kind == "vision":  # a VL model's tower: float (F16/BF16 as asked), pixels in, embeddings out
        flags = ["--quantize", float_mode(o.quantize)]
    elif graph.kind == "sample_head":  # the runtime passes as many seen ids as it keeps: a dynamic net
        flags = ["--quantize", "F32", "--dynamic"]
    else:  # greedy_head
        flags = ["--quantize", "F32"]
    flags += ["--chip", o.chip]
    if o.num_core > 1:
        flags += ["--num_core", str(o.num_core)]
    if o.num_device > 1:
        flags += ["--num_device", str(o.num_device)]
    return flags


def table_request(onnx_dir: Path, graph: GraphSpec, weight_type: str, norm_moves: bool = False) -> dict | None:
    """How to build `graph` straight from its table, or None when it is more than a table lookup/product.
    `norm_moves`: judge a head as `surgery optimize` will leave it once the final norm has moved into the last
    block (passes/final_norm.py), so its build can start while the blocks are still being exported."""
    if not graph.data_file or graph.kind not in ("embedding", "embedding_cache", "lm_head"):
        return None
    model = load_structure(onnx_dir / graph.file)
    table = next((t for t in model.graph.initializer if len(t.dims) == 2), None)
    # a table stored in bf16 for an fp32 graph is read through one Cast, which the chip's float type makes moot
    nodes = [n for n in model.graph.node if not (n.op_type == "Cast" and len(model.graph.node) == 2)]
    product = table_product(model) if norm_moves and graph.kind == "lm_head" else None
    if table is None or (len(nodes) != 1 and product is None):
        return None
    node = product or nodes[0]
    if node.op_type == "Gather" and node.input[0] == table.name and not any(a.i for a in node.attribute):
        kind = "gather"
    elif node.op_type == "Gemm" and table_product(model) is node:
        kind = "matmul"
    else:
        return None
    info = {e.key: e.value for e in table.external_data}
    dtypes = {1: "float32", 10: "float16", 16: "bfloat16"}
    if table.data_type not in dtypes:
        return None
    request = {"kind": kind, "weight_type": weight_type, "input": graph.inputs[0].name,
               "output": graph.outputs[0].name, "in_shape": graph.inputs[0].shape, "out_shape": graph.outputs[0].shape,
               "table": {"file": info["location"], "offset": int(info.get("offset", 0)),
                         "dtype": dtypes[table.data_type], "shape": list(table.dims)}}
    split = table_split(list(table.dims), weight_type, kind)
    return {**request, "split": split} if split else request


# a table larger than this goes to the compiler in parts of at most PART_BYTES (compile/tpumlir_tables.py: the
# deploy's codegen holds one more copy of its largest weight tensor); smaller tables stay whole, as before
SPLIT_BYTES = 512 << 20
PART_BYTES = 320 << 20


def table_split(shape: list[int], weight_type: str, kind: str) -> dict | None:
    """How a table is cut for the compiler: a lookup by columns, a product by rows (both exact)."""
    size = shape[0] * shape[1] * (4 if weight_type == "F32" else 2)
    if size <= SPLIT_BYTES:
        return None
    return {"axis": "cols" if kind == "gather" else "rows", "parts": -(-size // PART_BYTES)}


def table_npz(job: GraphJob) -> str:
    """The name of a table's weight file in the compiler's form, shared by the graphs that cut it alike."""
    split = job.table.get("split")
    cut = f".{split['axis']}{split['parts']}" if split else ""
    return f"{job.table['table']['file']}.{job.table['weight_type']}{cut}.npz"


@dataclass(frozen=True)
class GraphJob:
    name: str
    key: str  # content hashes of every input + flags + compiler version
    route: str  # "onnx" (model_transform) or "table" (built straight from the table)
    inputs: dict[str, str]  # file name -> sha256; the files sit together in one directory
    graph_file: str  # the .onnx among `inputs` (route onnx)
    shapes: list[list[int]] = field(default_factory=list)
    transform: list[str] = field(default_factory=list)  # extra model_transform arguments
    table: dict | None = None  # table_request(), its "file" one of `inputs` (route table)
    deploy: list[str] = field(default_factory=list)
    codes: dict | None = None  # {"bits", "group"}: weights on that grid go to the compiler as codes (tpumlir_codes)


def plan_job(onnx_dir: Path, graph: GraphSpec, options: CompileOptions, version: str,
             norm_moves: bool = False) -> GraphJob:
    flags = deploy_flags(graph, options)
    table = table_request(onnx_dir, graph, float_mode(options.quantize), norm_moves)
    if table:
        inputs = {table["table"]["file"]: graph.data_sha256 or ""}
    else:
        inputs = {graph.file: graph.sha256, **({graph.data_file: graph.data_sha256 or ""} if graph.data_file else {})}
    # a table build reads nothing of the graph but the request (its input types are fixed): the key leaves
    # the graph's input dtypes out, so a build started from the export (compile/sophgo_ahead.py) is the one
    # the optimized graph asks for
    codes = None if table else codes_request(onnx_dir, graph, options)
    parts = [sorted(inputs.items()), flags, version, graph.kind, table] if table else \
        [sorted(inputs.items()), [vars(t) for t in graph.inputs], flags, version, graph.kind, None, None,
         *([codes] if codes else [])]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    # the runtime passes as many seen ids as it keeps (LLM-TPU's Qwen3 demo: the repetition window)
    transform = ["--dynamic_shape_input_names", "input_ids"] if graph.kind == "sample_head" else []
    return GraphJob(graph.name, key, "table" if table else "onnx", inputs, graph.file,
                    [t.shape for t in graph.inputs], transform, table, flags, codes)


def codes_request(onnx_dir: Path, graph: GraphSpec, o: CompileOptions) -> dict | None:
    """For a block of a GPTQ/AWQ checkpoint compiled to asymmetric 4/8-bit weights: the weights that lie on
    the compile's group grid go to the compiler as codes (compile/tpumlir_codes.py), not re-quantized."""
    from surgery.compile.tpumlir_codes import HANDOVER_VERSION, handover_bits

    bits = handover_bits(o.quantize, o.symmetric)
    manifest = onnx_dir / "manifest.json"
    if graph.kind not in ("block", "block_cache") or bits is None or not manifest.is_file():
        return None
    source = json.loads(manifest.read_text()).get("source") or {}
    quantized = (source.get("checkpoint") or {}).get("quantization")
    return {"bits": bits, "group": o.group_size, "version": HANDOVER_VERSION} if quantized else None


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, threading.Lock())


def build(worker: TpuMlirWorker, job: GraphJob, source: Path, work: Path, cache: Path) -> Path:
    """The job's bmodel in `cache` (built by `worker` from the files in `source` unless cached)."""
    cached = cache / f"{job.key}.bmodel"
    gdir = work / job.name
    (gdir / "seconds.json").unlink(missing_ok=True)  # present only for a graph built by this run
    if cached.is_file():
        return cached
    gdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    mlir, bmodel, log = gdir / f"{job.name}.mlir", gdir / f"{job.name}.bmodel", gdir / "compile.log"
    if job.table:
        table = {**job.table["table"], "file": str(source / job.table["table"]["file"])}
        npz = work / "tables" / table_npz(job)
        npz.parent.mkdir(parents=True, exist_ok=True)
        with _lock(npz):  # the first of the table's graphs writes its weight file, the others wait and reuse it
            worker.call("table", f"building graph {job.name} from its table", log, workdir=gdir, name=job.name,
                        npz=npz, **{**job.table, "table": table})
    else:
        worker.call("transform", f"model_transform of graph {job.name}", log, workdir=gdir, name=job.name,
                    onnx=source / job.graph_file, shapes=job.shapes, extra=job.transform)
        if job.codes:  # a GPTQ/AWQ checkpoint's weights: its codes, not a second quantization
            from surgery.compile.tpumlir_codes import hand_over

            handed = hand_over(mlir, job.codes["group"], job.codes["bits"])
            with open(log, "a") as fh:
                fh.write(f"surgery: {len(handed)} MatMul weights handed over as codes (top.A16MatMul): {handed}\n")
    transformed = time.monotonic()
    worker.call("deploy", f"model_deploy of graph {job.name}", log, workdir=gdir,
                args=["--mlir", str(mlir), *job.deploy, "--model", str(bmodel)])
    (gdir / "seconds.json").write_text(json.dumps({"transform": round(transformed - start, 2),
                                                   "deploy": round(time.monotonic() - transformed, 2)}))
    if not bmodel.is_file():
        raise SurgeryError(f"model_deploy of graph {job.name} wrote no bmodel; see {log}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    shutil.copyfile(bmodel, tmp)
    os.replace(tmp, cached)
    return cached
