"""Sophgo adapter: every graph through TPU-MLIR with the flags people use for its kind, on long-lived compiler
workers (or spread over a Ray cluster, compile/executors.py), checked on the compiler's CPU simulator against
onnxruntime, then combined into the one bmodel LLM-TPU's runtime loads (`model_tool --combine`'s bytes in
bounded memory: compile/bmodel_combine.py).

Graphs that are only a vocabulary-table lookup or product (`embedding`, `embedding_cache`, and `lm_head`
once `surgery optimize` moved the final norm into the last block) are built straight from the table in the
chip's float type on one shared weight file, so the combined bmodel stores each table once, as
llm_convert's does. Graphs are cached by content (compile/sophgo_graphs.py).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from surgery.checks import DELTA, sampled
from surgery.compile.base import Adapter, CompileOptions, copy_host_files, finish, prepare
from surgery.compile.bmodel_combine import combine
from surgery.compile.sophgo_ahead import BuildAhead
from surgery.compile.sophgo_check import simulate
from surgery.compile.sophgo_graphs import QUANTS, float_mode, plan_job
from surgery.compile.toolchains import home, installed
from surgery.compile.tpumlir import WorkerPool
from surgery.manifest import Compiled, Manifest

# cosine floors on the simulator, per quantization mode, for the hidden states of every block, and for what
# a block adds to its input (lower: quantization noise is relative to the small update, not the residual)
MIN_COSINE = {"f16": 0.999, "bf16": 0.99, "w8f16": 0.99, "w8bf16": 0.99, "w4f16": 0.98, "w4bf16": 0.98}
MIN_DELTA = {"f16": 0.99, "bf16": 0.95, "w8f16": 0.95, "w8bf16": 0.95, "w4f16": 0.8, "w4bf16": 0.8}


# seconds a graph of each kind took (Qwen2-0.5B shape, 4 layers, seq 256, w4bf16 g64, bm1684x; the manifest's
# build_seconds / simulate_seconds), so the dearest start first and no long job runs alone at the end: the
# vocabulary-table graphs are the longest builds, the head the longest check
BUILD_COST = {"embedding": 9.0, "lm_head": 8.5, "embedding_cache": 7.5, "block": 2.3, "block_cache": 2.4,
              "greedy_head": 1.5, "sample_head": 1.0}
# (prefill blocks, simulated only at --check all, were not in that run: placed above a decode block)
# a vocabulary table this large (a 7B model's: 1.2 GB in bf16, Baichuan2-7B's 1.0 GB) is built and simulated
# alone, the idle workers stopped meanwhile: its deploy holds about three copies of it (3.8 GB at 7B), and
# beside a block build and two idle workers that took the compile stage's tree past 8 GB (bench/scale.py)
BIG_TABLE = 768 << 20


def big_table(job) -> bool:
    if not job.table:
        return False
    shape, dtype = job.table["table"]["shape"], job.table["table"]["dtype"]
    return shape[0] * shape[1] * (4 if dtype == "float32" else 2) >= BIG_TABLE


def cache_dir() -> Path:
    # absolute: the combine step runs in the output directory, so a relative $SURGERY_CACHE would not resolve
    return Path(os.environ.get("SURGERY_CACHE", home().parent / "cache")).absolute() / "sophgo"


class SophgoAdapter(Adapter):
    name = "sophgo"
    chips = ("bm1684x", "bm1688", "cv186ah")
    summary = "Sophgo TPUs through TPU-MLIR: one combined bmodel"
    toolchain = "sophgo"
    backend = "bmodel"
    loaded_by = "LLM-TPU's runtime (python_demo chat.cpp over libbmrt), on the board or the CPU simulator"
    runtime = "surgery.compile.sophgo_runtime:SophgoModel"
    quantizations = tuple(QUANTS)

    def table_dtype(self, options: CompileOptions) -> str | None:
        # its table nets are built in the chip's float type: export bf16 tables once rather than fp32
        return "bf16" if float_mode(options.quantize) == "BF16" else None

    def prewarm(self, options: CompileOptions) -> None:
        from surgery.compile.tpumlir import prewarm

        prewarm(options.jobs)

    def build_ahead(self, options: CompileOptions, work: Path) -> BuildAhead:
        from surgery.passes.pipelines import TARGETS

        norm_moves = TARGETS[self.target(options.chip)].get("final_norm") == "last_block"
        return BuildAhead(options, Path(work).absolute(), cache_dir(), norm_moves)

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor=None,
                ahead: BuildAhead | None = None) -> Manifest:
        """`ahead`: the table builds convert started during export, and the worker pool they run on."""
        from surgery.compile.executors import LocalExecutor

        onnx_dir, out, manifest, owned = prepare(self, onnx_dir, out, options)
        version = installed("sophgo")["version"]
        name = f"{manifest.model_type}_{options.quantize}_seq{manifest.seq_length}_{options.num_device}dev.bmodel"
        owned.add("work/", name)
        work = out / "work"
        jobs = [plan_job(onnx_dir, g, options, version) for g in manifest.graphs]
        early = {j.key for j in ahead.started(jobs)} if ahead else set()
        with ahead.pool if ahead else WorkerPool(options.jobs) as pool:
            kinds = {g.name: g.kind for g in manifest.graphs}
            local = LocalExecutor(pool, cost=lambda job: BUILD_COST.get(kinds[job.name], 1), exclusive=big_table)
            rest = [j for j in jobs if j.key not in early]
            paths = dict(zip((j.key for j in rest), (executor or local).build(rest, onnx_dir, work, cache_dir()),
                             strict=True))
            for job in jobs:  # started ahead: built by now, or being built; one that failed is built here
                if job.key in early:
                    paths[job.key] = ahead.wait(job) or local.build([job], onnx_dir, work, cache_dir())[0]
            built = [paths[j.key] for j in jobs]
            combined, tmp = out / name, out / f".{name}.tmp"

            # beside the checks: the combine holds flatbuffers, not the nets (bmodel_combine.py)
            with ThreadPoolExecutor(1) as beside:
                combining = beside.submit(combine, built, tmp, work / "combine")
                seconds: dict[str, float] = {}
                rows = simulate(pool, onnx_dir, dict(zip((j.name for j in jobs), built, strict=True)),
                                sampled(manifest, options.check, costly=True), manifest.vocab_size, work, seconds,
                                heavy={j.name for j in jobs if big_table(j)})
                digest = combining.result()  # its error, if any, here; the sha256 taken as it was written
        os.replace(tmp, combined)
        copy_host_files(onnx_dir, out, manifest)
        compiled = replace(manifest, backend="bmodel", graphs=[
            replace(g, file=name, sha256=digest, data_file=None, data_sha256=None) for g in manifest.graphs])
        compiled.compiled = Compiled(
            adapter=self.name, chip=options.chip, options=vars(options), toolchain={"tpu_mlir": version},
            files=[name], check=options.check,
            details={"routes": {j.name: {"route": j.route, "deploy": j.deploy, "cache_key": j.key} for j in jobs},
                     "build_seconds": built_seconds([work, *([ahead.work] if ahead else [])], jobs),
                     "simulate_seconds": seconds})
        compiled.write(out)
        shutil.rmtree(work / "tables", ignore_errors=True)  # compiler intermediates: GBs at 7B
        if ahead:
            shutil.rmtree(ahead.work, ignore_errors=True)
        for scratch in work.glob("*/*weight*.npz"):
            scratch.unlink(missing_ok=True)
        floors = {"hidden_states": MIN_COSINE[options.quantize], DELTA: MIN_DELTA[options.quantize]}
        return finish(out, compiled, rows, floors, 0.0, f"{options.chip} on the simulator")


def built_seconds(works: list[Path], jobs: list) -> dict[str, dict[str, float]]:
    """{graph: {"transform": s, "deploy": s}} for the graphs this machine built in this run (not cached ones,
    nor those a Ray cluster built): what a graph of each kind costs at this size (bench/scale.py)."""
    timings = {j.name: [w / j.name / "seconds.json" for w in works] for j in jobs}
    return {name: json.loads(path.read_text()) for name, paths in timings.items() for path in paths
            if path.is_file()}


ADAPTER = SophgoAdapter()
