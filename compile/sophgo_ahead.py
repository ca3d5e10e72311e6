"""Vocabulary-table graphs built while export and optimize still run.

A table graph (`embedding`, `embedding_cache`, and `lm_head` once optimize has moved the final norm out of
it) is built from the table alone (compile/sophgo_graphs.py), and export writes the table before any graph.
So `convert` hands each graph to `BuildAhead.offer` as soon as export has finished it: a table graph starts
building on the compiler workers at once, into the content-addressed cache, while the main process goes on
exporting and optimizing the blocks on the other core. Its cache key is the one the optimized graph asks
for, so the compile stage finds it built, or waits for it. The simulator check of such a net follows its
build on the same worker, against the table's lookup/product computed from the file (the optimized graph,
its usual reference, does not exist yet; it is that same product). At Qwen2-0.5B's shape these builds and
checks are half of the compile stage's worker time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from surgery.compile.base import CompileOptions
from surgery.compile.sophgo_check import simulate_one
from surgery.compile.sophgo_graphs import GraphJob, build, plan_job
from surgery.compile.toolchains import installed
from surgery.compile.tpumlir import TpuMlirWorker, WorkerPool
from surgery.manifest import GraphSpec
from surgery.parity import Parity
from surgery.table_reference import request_outputs

TABLE_KINDS = ("embedding", "embedding_cache", "lm_head")


class BuildAhead:
    """Table builds started from the export, on the worker pool the compile stage then goes on using."""

    def __init__(self, options: CompileOptions, work: Path, cache: Path, norm_moves: bool) -> None:
        self.pool = WorkerPool(options.jobs)
        self.options, self.work, self.cache, self.norm_moves = options, work, cache, norm_moves
        self.version = installed("sophgo")["version"]
        self.threads: dict[str, threading.Thread] = {}  # by job key
        self.results: dict[str, Path] = {}
        self.rows: dict[str, list[Parity]] = {}  # the simulator's check of each, when the level asks for one
        self.seconds: dict[str, float] = {}  # simulate seconds by graph name

    def offer(self, onnx_dir: Path, graph: GraphSpec) -> None:
        """Start building `graph` if it is a table graph whose build the optimized graph will ask for."""
        if graph.kind not in TABLE_KINDS:
            return
        job = plan_job(onnx_dir, graph, self.options, self.version, self.norm_moves)
        if job.route != "table" or job.key in self.threads:
            return
        thread = threading.Thread(target=self._build, args=(job, graph, onnx_dir), daemon=True)
        self.threads[job.key] = thread
        thread.start()

    def _build(self, job: GraphJob, graph: GraphSpec, source: Path) -> None:
        def run(worker: TpuMlirWorker, j: GraphJob) -> None:
            self.results[j.key] = build(worker, j, source, self.work, self.cache)
            if self.options.check != "none":  # every check level simulates the table nets (surgery/checks.py)
                vocab = j.table["table"]["shape"][0]
                self.rows[j.key] = simulate_one(worker, source, graph, self.results[j.key], vocab,
                                                self.work / j.name, self.seconds,
                                                reference=lambda feeds: request_outputs(source, j.table, feeds))

        try:
            self.pool.map(run, [job])
        except Exception:  # noqa: BLE001  the compile stage builds or checks it again and reports it there
            pass

    def started(self, jobs: Iterable[GraphJob]) -> list[GraphJob]:
        return [j for j in jobs if j.key in self.threads]

    def wait(self, job: GraphJob) -> Path | None:
        """The bmodel of a job this started, once built; None if its build failed."""
        self.threads[job.key].join()
        return self.results.get(job.key)

    def checked(self, job: GraphJob) -> list[Parity] | None:
        """The simulator's parity rows of a job this started and checked (after `wait`), else None."""
        return self.rows.get(job.key)
