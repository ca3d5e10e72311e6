"""`surgery optimize`: run a target's pass pipeline over every graph of an export directory.

Each graph is checked on onnxruntime against the graph it came from (cosine >= 0.99999 on every output);
a failing pipeline is replayed pass by pass to name the pass that broke it. Originals move to
`original/` (same file names, so external data references stay valid) unless `--no-keep`; new graphs are
written to temp files and renamed; the manifest records the pipeline and node counts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from surgery.errors import SurgeryError
from surgery.export.exporter import EXTERNAL_DATA_ABOVE, random_inputs
from surgery.fsutil import sha256_file
from surgery.manifest import GraphSpec, Manifest
from surgery.parity import compare
from surgery.passes import PASSES, run_pass
from surgery.passes.base import opset_of
from surgery.passes.pipelines import TARGETS

MIN_COSINE = 0.99999
ORIGINALS = "original"


@dataclass
class GraphReport:
    graph: str
    counts: list[tuple[str, int, int]]  # (pass, sites, nodes after); first row: ("input", 0, nodes)
    cosine: float | None


def pipeline(target: str, passes: list[str] | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    if target not in TARGETS:
        raise SurgeryError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    names = [n for n in (passes or TARGETS[target]["passes"]) if n not in skip]
    unknown = sorted(set(names) - set(PASSES))
    if unknown:
        raise SurgeryError(f"no pass named {unknown[0]!r}; see `surgery passes`")
    return names


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _worst(got: list, want: list) -> float:
    return min(compare("", "", a, b).cosine for a, b in zip(got, want, strict=True))


def optimize_graph(model: onnx.ModelProto, names: list[str], graph: GraphSpec, vocab: int,
                   check: bool) -> tuple[onnx.ModelProto, GraphReport]:
    counts = [("input", 0, len(model.graph.node))]
    original = model
    for name in names:
        model, sites = run_pass(model, PASSES[name])
        counts.append((name, sites, len(model.graph.node)))
    cosine = None
    if check:
        feeds = random_inputs(graph, vocab)
        want = _run(original, feeds)
        cosine = _worst(_run(model, feeds), want)
        if not cosine >= MIN_COSINE:
            replay = original
            for name in names:
                replay, _ = run_pass(replay, PASSES[name])
                if not _worst(_run(replay, feeds), want) >= MIN_COSINE:
                    raise SurgeryError(f"{graph.name}: pass {name} changes the outputs (cosine {cosine:.6f}); "
                                       f"rerun with --skip {name}")
    return model, GraphReport(graph.name, counts, cosine)


def _save(model: onnx.ModelProto, path: Path) -> str | None:
    """Write `model` to `path` atomically; large weights go to `<name>.onnx.data`. Returns that name."""
    data = path.with_name(path.name + ".data")
    tmp = path.with_name(f".{path.name}.tmp")
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE
    if large:
        tmp_data = f".{data.name}.tmp"
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data, size_threshold=1024)
        # the graph names the final data file; rename the data first, then the graph
        model = onnx.load(str(tmp), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, str(tmp))
        os.replace(path.with_name(tmp_data), data)
    else:
        onnx.save_model(model, str(tmp))
        if data.exists():
            data.unlink()
    os.replace(tmp, path)
    return data.name if large else None


def optimize_dir(directory: Path, target: str, passes: list[str] | None = None, skip: tuple[str, ...] = (),
                 keep: bool = True, check: bool = True,
                 progress: Callable[[str], None] = lambda name: None) -> list[GraphReport]:
    manifest = Manifest.read(directory)
    names = pipeline(target, passes, skip)
    if check:
        manifest.require_numpy_dtype("the parity check of surgery optimize (use --no-check)")
    reports = []
    for graph in manifest.graphs:
        progress(graph.name)
        path = directory / graph.file
        model = onnx.load(str(path))
        model, report = optimize_graph(model, names, graph, manifest.vocab_size, check)
        reports.append(report)
        if keep and not (directory / ORIGINALS / graph.file).exists():
            (directory / ORIGINALS).mkdir(exist_ok=True)
            for file in (graph.file, graph.data_file):
                if file:
                    shutil.copy2(directory / file, directory / ORIGINALS / file)
        graph.data_file = _save(model, path)
        graph.sha256 = sha256_file(path)
    manifest.opset = max(opset_of(onnx.load(str(directory / g.file), load_external_data=False))
                         for g in manifest.graphs)
    manifest.optimizations.append({
        "target": target, "passes": names, "checked": check,
        "graphs": {r.graph: {"counts": [list(c) for c in r.counts], "cosine": r.cosine} for r in reports},
    })
    manifest.write(directory)
    return reports
