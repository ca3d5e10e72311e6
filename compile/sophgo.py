"""Sophgo adapter: each graph through TPU-MLIR with the flags people use for that kind of graph, on long-lived
compiler workers (compile/tpumlir.py), checked on the compiler's CPU simulator against onnxruntime, then
`model_tool --combine` into one bmodel that LLM-TPU's runtime loads.

Graphs that are only a vocabulary-table lookup or product (`embedding`, `embedding_cache`, and `lm_head`
once `surgery optimize` moved the final norm into the last block) are built straight from the table in
the chip's float type, on one shared weight file: their weights are then byte-identical and the combined
bmodel stores the table once (twice for untied heads), as llm_convert's does. Compiled graphs are cached
by graph and weight hashes + flags + compiler version, so a rerun compiles only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from surgery.checks import DELTA, LEVELS, check_graph, sampled
from surgery.compile.commands import run_logged
from surgery.compile.toolchains import bin_env, home, installed, python_of
from surgery.compile.tpumlir import TpuMlirWorker, WorkerPool
from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file
from surgery.manifest import GraphSpec, Manifest
from surgery.onnxio import load_structure
from surgery.outputs import claim
from surgery.passes.final_norm import table_product

CHIPS = ("bm1684x", "bm1688", "cv186ah")
QUANTS = {"bf16": "BF16", "f16": "F16", "w8bf16": "W8BF16", "w4bf16": "W4BF16", "w8f16": "W8F16", "w4f16": "W4F16"}
# cosine floors on the simulator, per quantization mode, for the hidden states of every block, and for what
# a block adds to its input (lower: quantization noise is relative to the small update, not the residual)
MIN_COSINE = {"f16": 0.999, "bf16": 0.99, "w8f16": 0.99, "w8bf16": 0.99, "w4f16": 0.98, "w4bf16": 0.98}
MIN_DELTA = {"f16": 0.99, "bf16": 0.95, "w8f16": 0.95, "w8bf16": 0.95, "w4f16": 0.8, "w4bf16": 0.8}


@dataclass(frozen=True)
class SophgoOptions:
    chip: str = "bm1684x"
    quantize: str = "w4bf16"
    group_size: int = 64
    symmetric: bool = False
    num_core: int = 1
    num_device: int = 1
    jobs: int = 2
    check: str = "sample"  # none | sample | all (compile/checks.py)


def float_mode(quantize: str) -> str:
    return "F16" if quantize.endswith("f16") and not quantize.endswith("bf16") else "BF16"


def deploy_flags(graph: GraphSpec, o: SophgoOptions) -> list[str]:
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
    else:  # greedy_head, penalty_sample_head
        flags = ["--quantize", "F32"]
    flags += ["--chip", o.chip]
    if o.num_core > 1:
        flags += ["--num_core", str(o.num_core)]
    if o.num_device > 1:
        flags += ["--num_device", str(o.num_device)]
    return flags


def table_job(onnx_dir: Path, graph: GraphSpec, weight_type: str) -> dict | None:
    """How to build `graph` straight from its table, or None when it is more than a table lookup/product."""
    if not graph.data_file or graph.kind not in ("embedding", "embedding_cache", "lm_head"):
        return None
    model = load_structure(onnx_dir / graph.file)
    table = next((t for t in model.graph.initializer if len(t.dims) == 2), None)
    # a table stored in bf16 for an fp32 graph is read through one Cast, which the chip's float type makes moot
    nodes = [n for n in model.graph.node if not (n.op_type == "Cast" and len(model.graph.node) == 2)]
    if table is None or len(nodes) != 1:
        return None
    node = nodes[0]
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
    return {"kind": kind, "weight_type": weight_type, "input": graph.inputs[0].name, "output": graph.outputs[0].name,
            "in_shape": graph.inputs[0].shape, "out_shape": graph.outputs[0].shape,
            "table": {"file": str(onnx_dir / info["location"]), "offset": int(info.get("offset", 0)),
                      "dtype": dtypes[table.data_type], "shape": list(table.dims)}}


def cache_key(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compile_sophgo(onnx_dir: Path, out: Path, options: SophgoOptions) -> Manifest:
    onnx_dir, out = Path(onnx_dir).absolute(), Path(out).absolute()  # tools run in other cwds
    manifest = Manifest.read(onnx_dir)
    if options.chip not in CHIPS:
        raise SurgeryError(f"unknown chip {options.chip!r}; Sophgo chips: {', '.join(CHIPS)}")
    if options.quantize not in QUANTS:
        raise SurgeryError(f"unknown quantization {options.quantize!r}; choose one of {', '.join(QUANTS)}")
    if options.check not in LEVELS:
        raise SurgeryError(f"unknown check level {options.check!r}; choose one of {', '.join(LEVELS)}")
    if manifest.backend != "onnxruntime" or manifest.opset > 17:
        raise SurgeryError(f"{onnx_dir} has opset {manifest.opset} graphs; TPU-MLIR takes opset 17: run "
                           f"`surgery optimize {onnx_dir} --target {options.chip}` (or export with the "
                           "torchscript exporter) first")
    python_of("sophgo")  # a one-line error when the toolchain is missing
    version = installed("sophgo")["version"]
    name = f"{manifest.model_type}_{options.quantize}_seq{manifest.seq_length}_{options.num_device}dev.bmodel"
    owned = claim(out, "compile", {"export": onnx_dir})
    owned.add("work/", name, "manifest.json", *manifest.tokenizer_files,
              *([manifest.embedding_file["file"]] if manifest.embedding_file else []))
    work, cache = out / "work", Path(os.environ.get("SURGERY_CACHE", home().parent / "cache")) / "sophgo"
    cache.mkdir(parents=True, exist_ok=True)
    weight_type = float_mode(options.quantize)

    def build(worker: TpuMlirWorker, graph: GraphSpec) -> tuple[str, Path, dict]:
        flags = deploy_flags(graph, options)
        table = table_job(onnx_dir, graph, weight_type)
        source = table["table"] | {"sha256": graph.data_sha256} if table else None
        key = cache_key([graph.sha256, graph.data_sha256, [vars(t) for t in graph.inputs], flags, version,
                         table and {k: v for k, v in table.items() if k != "table"}])
        cached = cache / f"{key}.bmodel"
        gdir = work / graph.name
        mlir, bmodel, log = gdir / f"{graph.name}.mlir", gdir / f"{graph.name}.bmodel", gdir / "compile.log"
        how = {"route": "table" if table else "onnx", "deploy": flags}
        if cached.is_file():
            return graph.name, cached, how
        gdir.mkdir(parents=True, exist_ok=True)
        if table:
            npz = work / "tables" / f"{Path(source['file']).name}.{weight_type}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            worker.call("table", f"building graph {graph.name} from its table", log, workdir=gdir, name=graph.name,
                        npz=npz, **table)
        else:
            worker.call("transform", f"model_transform of graph {graph.name}", log, workdir=gdir, name=graph.name,
                        onnx=onnx_dir / graph.file, shapes=[t.shape for t in graph.inputs])
        worker.call("deploy", f"model_deploy of graph {graph.name}", log, workdir=gdir,
                    args=["--mlir", str(mlir), *flags, "--model", str(bmodel)])
        if not bmodel.is_file():
            raise SurgeryError(f"model_deploy of graph {graph.name} wrote no bmodel; see {log}")
        tmp = cached.with_name(f".{cached.name}.tmp")
        shutil.copyfile(bmodel, tmp)
        os.replace(tmp, cached)
        return graph.name, cached, how

    with WorkerPool(options.jobs) as pool:
        built = pool.map(build, manifest.graphs)
        combined, tmp = out / name, out / f".{name}.tmp"
        run_logged(["model_tool", "--combine", *(str(path) for _, path, _ in built), "-o", str(tmp)],
                   work / "combine.log", "model_tool --combine", cwd=out, env=bin_env("sophgo"))
        os.replace(tmp, combined)
        extra = [manifest.embedding_file["file"]] if manifest.embedding_file else []
        for file in [*manifest.tokenizer_files, *extra]:
            shutil.copyfile(onnx_dir / file, out / file)
        digest = sha256_file(combined)
        compiled = replace(manifest, backend="bmodel", graphs=[replace(g, file=name, sha256=digest, data_file=None,
                                                                       data_sha256=None) for g in manifest.graphs])
        compiled.compiled = {"chip": options.chip, "quantize": options.quantize, "options": vars(options),
                             "toolchain": {"tpu_mlir": version}, "source": str(onnx_dir), "bmodel": name,
                             "routes": {g: how for g, _, how in built}, "check": options.check, "parity": []}
        compiled.write(out)
        rows = simulate(pool, onnx_dir, {g: path for g, path, _ in built}, sampled(manifest, options.check),
                        manifest.vocab_size, work)
    shutil.rmtree(work / "tables", ignore_errors=True)  # compiler intermediates: GBs at 7B
    for scratch in work.glob("*/*weight*.npz"):
        scratch.unlink(missing_ok=True)
    compiled.compiled["parity"] = [r.as_dict() for r in rows]
    compiled.write(out)
    floors = {"hidden_states": MIN_COSINE[options.quantize], DELTA: MIN_DELTA[options.quantize]}
    bad = [r for r in rows if r.output in floors and not r.cosine >= floors[r.output]]
    if bad:
        raise SurgeryError(f"graph {bad[0].graph}: simulator {bad[0].output} cosine {bad[0].cosine:.5f} is below "
                           f"{floors[bad[0].output]} for {options.quantize}; see {out / 'manifest.json'} for every "
                           "output")
    return compiled


def simulate(pool: WorkerPool, onnx_dir: Path, bmodels: dict[str, Path], graphs: list[GraphSpec], vocab: int,
             work: Path):
    """Each chosen graph's bmodel on the CPU simulator against onnxruntime on the same inputs."""

    def one(worker: TpuMlirWorker, graph: GraphSpec):
        gdir = work / graph.name
        gdir.mkdir(parents=True, exist_ok=True)

        def run(g: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            np.savez(gdir / "sim_in.npz", **feeds)
            worker.call("simulate", f"simulating graph {g.name}", gdir / "simulate.log", bmodel=bmodels[g.name],
                        net=g.name,
                        inputs=gdir / "sim_in.npz", outputs=gdir / "sim_out.npz")
            got = np.load(gdir / "sim_out.npz")
            return [got[next(k for k in got.files if k == t.name or k.startswith(f"{t.name}_"))] for t in g.outputs]

        return check_graph(onnx_dir, graph, vocab, run)

    return [row for rows in pool.map(one, graphs) for row in rows]
