"""Vocabulary-table graphs built while export and optimize still run.

A table graph (`embedding`, `embedding_cache`, and `lm_head` once optimize has moved the final norm out of
it) is built from the table alone (compile/sophgo_graphs.py), and export writes the table before any graph.
So `convert` hands each graph to `BuildAhead.offer` as soon as export has finished it: a table graph starts
building on the compiler workers at once, into the content-addressed cache, while the main process goes on
exporting and optimizing the blocks on the other core. Its cache key is the one the optimized graph asks
for, so the compile stage finds it built, or waits for it. At Qwen2-0.5B's shape these builds are half of
the compile stage's worker time.

Only with checks off (`--check none`): with checks, export and optimize run onnxruntime on every sampled
graph, and beside two busy compiler workers (and the GBs of files they write) those checks ran four times
slower; a 0.5B conversion with checks took 110 s with tables built ahead, 78 s without (measured side by
side, bench/vs_llm_convert.py's model).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from surgery.compile.base import CompileOptions
from surgery.compile.sophgo_graphs import GraphJob, build, plan_job
from surgery.compile.toolchains import installed
from surgery.compile.tpumlir import WorkerPool
from surgery.manifest import GraphSpec

TABLE_KINDS = ("embedding", "embedding_cache", "lm_head")


class BuildAhead:
    """Table builds started from the export, on the worker pool the compile stage then goes on using."""

    def __init__(self, options: CompileOptions, work: Path, cache: Path, norm_moves: bool) -> None:
        self.pool = WorkerPool(options.jobs)
        self.options, self.work, self.cache, self.norm_moves = options, work, cache, norm_moves
        self.version = installed("sophgo")["version"]
        self.threads: dict[str, threading.Thread] = {}  # by job key
        self.results: dict[str, Path] = {}

    def offer(self, onnx_dir: Path, graph: GraphSpec) -> None:
        """Start building `graph` if it is a table graph whose build the optimized graph will ask for."""
        if graph.kind not in TABLE_KINDS:
            return
        job = plan_job(onnx_dir, graph, self.options, self.version, self.norm_moves)
        if job.route != "table" or job.key in self.threads:
            return
        thread = threading.Thread(target=self._build, args=(job, onnx_dir), daemon=True)
        self.threads[job.key] = thread
        thread.start()

    def _build(self, job: GraphJob, source: Path) -> None:
        try:
            self.results[job.key] = self.pool.map(lambda w, j: build(w, j, source, self.work, self.cache), [job])[0]
        except Exception:  # noqa: BLE001  the compile stage builds it again and reports the failure there
            pass

    def started(self, jobs: Iterable[GraphJob]) -> list[GraphJob]:
        return [j for j in jobs if j.key in self.threads]

    def wait(self, job: GraphJob) -> Path | None:
        """The bmodel of a job this started, once built; None if its build failed."""
        self.threads[job.key].join()
        return self.results.get(job.key)
