"""Sophgo adapter: each graph through TPU-MLIR (`model_transform`, then `model_deploy` with the flags people
use for that kind of graph), checked on the compiler's CPU simulator (`model_runner`) against onnxruntime,
then `model_tool --combine` into one bmodel.

Compiled graphs are cached by graph hash + flags + compiler version, so a rerun compiles only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from surgery.compile.commands import parallel, run_logged
from surgery.compile.toolchains import bin_env, home, installed, python_of
from surgery.errors import SurgeryError
from surgery.export.exporter import random_inputs
from surgery.fsutil import sha256_file
from surgery.manifest import GraphSpec, Manifest
from surgery.parity import Parity, compare
from surgery.runtime import OnnxModel

CHIPS = ("bm1684x", "bm1688", "cv186ah")
QUANTS = {"bf16": "BF16", "f16": "F16", "w8bf16": "W8BF16", "w4bf16": "W4BF16", "w8f16": "W8F16", "w4f16": "W4F16"}
# cosine floors on the simulator, per quantization mode, for the hidden states of every block
MIN_COSINE = {"f16": 0.999, "bf16": 0.99, "w8f16": 0.99, "w8bf16": 0.99, "w4f16": 0.98, "w4bf16": 0.98}


@dataclass(frozen=True)
class SophgoOptions:
    chip: str = "bm1684x"
    quantize: str = "w4bf16"
    group_size: int = 64
    symmetric: bool = False
    num_core: int = 1
    num_device: int = 1
    jobs: int = 2
    check: bool = True


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


def transform_flags(graph: GraphSpec, onnx_path: Path, mlir: Path) -> list[str]:
    shapes = json.dumps([t.shape for t in graph.inputs]).replace(" ", "")
    return ["--model_name", graph.name, "--model_def", str(onnx_path), "--input_shapes", shapes,
            "--input_types", ",".join(t.dtype for t in graph.inputs), "--mlir", str(mlir)]


def cache_key(onnx_dir: Path, graph: GraphSpec, flags: list[str], version: str) -> str:
    """The graph's bytes (and external data), its input shapes, the flags and the compiler version."""
    files = [sha256_file(onnx_dir / f) for f in (graph.file, graph.data_file) if f]
    return hashlib.sha256(json.dumps([files, [vars(t) for t in graph.inputs], flags, version]).encode()
                          ).hexdigest()[:24]


def compile_sophgo(onnx_dir: Path, out: Path, options: SophgoOptions) -> Manifest:
    onnx_dir, out = Path(onnx_dir).absolute(), Path(out).absolute()  # tools run in other cwds
    manifest = Manifest.read(onnx_dir)
    if options.chip not in CHIPS:
        raise SurgeryError(f"unknown chip {options.chip!r}; Sophgo chips: {', '.join(CHIPS)}")
    if options.quantize not in QUANTS:
        raise SurgeryError(f"unknown quantization {options.quantize!r}; choose one of {', '.join(QUANTS)}")
    if manifest.backend != "onnxruntime" or manifest.opset > 17:
        raise SurgeryError(f"{onnx_dir} has opset {manifest.opset} graphs; TPU-MLIR takes opset 17: run "
                           f"`surgery optimize {onnx_dir} --target {options.chip}` (or export with the "
                           "torchscript exporter) first")
    python_of("sophgo")  # a one-line error when the toolchain is missing
    version = installed("sophgo")["version"]
    env = bin_env("sophgo")
    out.mkdir(parents=True, exist_ok=True)
    work, cache = out / "work", Path(os.environ.get("SURGERY_CACHE", home().parent / "cache")) / "sophgo"
    cache.mkdir(parents=True, exist_ok=True)

    def build(graph: GraphSpec) -> tuple[str, Path, list[list[str]]]:
        flags = deploy_flags(graph, options)
        cached = cache / f"{cache_key(onnx_dir, graph, flags, version)}.bmodel"
        gdir = work / graph.name
        gdir.mkdir(parents=True, exist_ok=True)
        mlir, bmodel = gdir / f"{graph.name}.mlir", gdir / f"{graph.name}.bmodel"
        commands = [["model_transform", *transform_flags(graph, onnx_dir / graph.file, mlir)],
                    ["model_deploy", "--mlir", str(mlir), *flags, "--model", str(bmodel)]]
        if not cached.is_file():
            log = gdir / "compile.log"
            for command, made in zip(commands, (mlir, bmodel), strict=True):
                run_logged(command, log, f"{command[0]} of graph {graph.name}", cwd=gdir, env=env, expect=made)
            tmp = cached.with_suffix(".tmp")
            shutil.copyfile(bmodel, tmp)
            tmp.replace(cached)
        return graph.name, cached, commands

    built = parallel(build, manifest.graphs, options.jobs)
    name = f"{manifest.model_type}_{options.quantize}_seq{manifest.seq_length}_{options.num_device}dev.bmodel"
    combined = out / name
    tmp = out / f".{name}.tmp"
    run_logged(["model_tool", "--combine", *(str(path) for _, path, _ in built), "-o", str(tmp)],
               work / "combine.log", "model_tool --combine", cwd=out, env=env)
    tmp.replace(combined)
    for file in [*manifest.tokenizer_files, *([manifest.embedding_file["file"]] if manifest.embedding_file else [])]:
        shutil.copyfile(onnx_dir / file, out / file)
    compiled = replace(manifest, backend="bmodel",
                       graphs=[replace(g, file=name, data_file=None) for g in manifest.graphs])
    compiled.compiled = {"chip": options.chip, "quantize": options.quantize, "options": vars(options),
                         "toolchain": {"tpu_mlir": version}, "source": str(onnx_dir.resolve()), "bmodel": name,
                         "commands": {g: [" ".join(c) for c in cmds] for g, _, cmds in built}, "parity": []}
    compiled.write(out)
    if options.check:
        rows = simulate(onnx_dir, {g: path for g, path, _ in built}, work, env)
        compiled.compiled["parity"] = [r.as_dict() for r in rows]
        compiled.write(out)
        floor = MIN_COSINE[options.quantize]
        bad = [r for r in rows if r.output == "hidden_states" and not r.cosine >= floor]
        if bad:
            raise SurgeryError(f"graph {bad[0].graph}: simulator hidden_states cosine {bad[0].cosine:.5f} is below "
                               f"{floor} for {options.quantize}; see {out / 'manifest.json'} for every output")
    return compiled


def simulate(onnx_dir: Path, bmodels: dict[str, Path], work: Path, env: dict) -> list[Parity]:
    """Every compiled graph on the CPU simulator (model_runner) against onnxruntime on the same inputs."""
    reference = OnnxModel(onnx_dir)
    rows = []
    for graph in reference.manifest.graphs:
        feeds = random_inputs(graph, reference.manifest.vocab_size)
        gdir = work / graph.name
        gdir.mkdir(parents=True, exist_ok=True)
        np.savez(gdir / "sim_in.npz", **feeds)
        run_logged(["model_runner", "--input", str(gdir / "sim_in.npz"), "--model", str(bmodels[graph.name]),
                    "--output", str(gdir / "sim_out.npz")], gdir / "simulate.log",
                   f"model_runner of graph {graph.name}", cwd=gdir, env=env)
        got = np.load(gdir / "sim_out.npz")
        want = reference.run(graph.name, **feeds)
        for spec, ref in zip(graph.outputs, want, strict=True):
            key = next((k for k in got.files if k == spec.name or k.startswith(f"{spec.name}_")), None)
            if key is None:
                raise SurgeryError(f"model_runner output of {graph.name} has no {spec.name} ({got.files})")
            rows.append(compare(graph.name, spec.name, got[key].reshape(ref.shape), ref))
    return rows
