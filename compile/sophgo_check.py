"""Compiled Sophgo nets on TPU-MLIR's CPU simulator against their reference, one net at a time.

Each chosen graph's own bmodel runs on the simulator (on a compiler worker, compile/tpumlir_worker.py) with
the contract's inputs; `surgery.checks.check_graph` compares it with onnxruntime on the graph, or, for a net
built from its vocabulary table, with the table's lookup/product computed from the file.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from surgery.checks import check_graph
from surgery.compile.tpumlir import TpuMlirWorker, WorkerPool
from surgery.manifest import GraphSpec
from surgery.parity import Parity

# seconds a simulation of each kind took (Qwen2-0.5B shape, 4 layers, seq 256, w4bf16 g64, bm1684x; the
# manifest's simulate_seconds), so the dearest start first
SIMULATE_COST = {"lm_head": 21.0, "block": 15.0, "block_cache": 12.0, "embedding": 5.0, "embedding_cache": 5.0}


def simulate(pool: WorkerPool, onnx_dir: Path, bmodels: dict[str, Path], graphs: list[GraphSpec], vocab: int,
             work: Path, seconds: dict[str, float], heavy: Collection[str] = ()) -> list[Parity]:
    """Each chosen graph's bmodel on the simulator (the time each took goes into `seconds`: the manifest says
    what a check level costs at this size). Graphs named in `heavy` (a big table's) run one at a time."""

    def one(worker: TpuMlirWorker, graph: GraphSpec) -> list[Parity]:
        gdir = work / graph.name
        gdir.mkdir(parents=True, exist_ok=True)

        def run(g: GraphSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            np.savez(gdir / "sim_in.npz", **feeds)
            start = time.monotonic()
            worker.call("simulate", f"simulating graph {g.name}", gdir / "simulate.log", bmodel=bmodels[g.name],
                        net=g.name, inputs=gdir / "sim_in.npz", outputs=gdir / "sim_out.npz")
            seconds[g.name] = round(time.monotonic() - start, 2)
            got = np.load(gdir / "sim_out.npz")  # by name; TPU-MLIR renames some outputs, whose order it keeps
            names = [next((k for k in got.files if k == t.name or k.startswith(f"{t.name}_")), got.files[i])
                     for i, t in enumerate(g.outputs)]
            return [got[k] for k in names]

        return check_graph(onnx_dir, graph, vocab, run)

    return [row for rows in pool.map(one, graphs, cost=lambda g: SIMULATE_COST.get(g.kind, 1),
                                     exclusive=lambda g: g.name in heavy) for row in rows]
