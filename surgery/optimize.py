"""`surgery optimize`: run a target's pass pipeline over every graph of an export directory.

Graphs are loaded without their external weights, which are sealed into plain inputs while the passes
run (surgery/onnxio.py): at 7B no pass reads, copies or re-serializes a weight it does not rewrite, and a
graph over 2 GB optimizes like a small one. A graph no pass changed is left as it is; a changed one is
checked on onnxruntime against the graph it came from (cosine >= 0.99999 on every output), and a failing
pipeline is replayed pass by pass to name the pass that broke it. Unless `--no-keep`, each changed graph's
original stays beside it as `<name>.original.onnx`, reading the same (unchanged) data file; the manifest
records the pipeline and node counts.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from surgery import journal
from surgery.checks import sampled
from surgery.contract import random_inputs
from surgery.errors import SurgeryError
from surgery.manifest import GraphSpec, Manifest
from surgery.onnxio import load_structure, run_once, save_graph, seal, unseal
from surgery.outputs import Output, adopt
from surgery.parity import compare
from surgery.passes import PASSES, final_norm, run_pass
from surgery.passes.base import opset_of
from surgery.passes.pipelines import TARGETS

MIN_COSINE = 0.99999
ORIGINAL_SUFFIX = ".original.onnx"


@dataclass
class GraphReport:
    graph: str
    counts: list[tuple[str, int, int]]  # (pass, sites, nodes after); first row: ("input", 0, nodes)
    cosine: float | None  # None: not checked (checking off, or no pass changed the graph)


def pipeline(target: str, passes: list[str] | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    if target not in TARGETS:
        raise SurgeryError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    names = passes or TARGETS[target]["passes"]
    unknown = sorted((set(names) | set(skip)) - set(PASSES))
    if unknown:
        raise SurgeryError(f"no pass named {unknown[0]!r}; see `surgery passes`")
    return [n for n in names if n not in skip]


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_once(path, feeds)


def _worst(got: list, want: list) -> float:
    return min(compare("", "", a, b).cosine for a, b in zip(got, want, strict=True))


def _passes(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[tuple[str, int, int]]]:
    """The passes over a graph's structure (external weights sealed), with sites and node counts."""
    sealed = seal(model)
    counts = [("input", 0, len(model.graph.node))]
    for name in names:
        model, sites = run_pass(model, PASSES[name])
        counts.append((name, sites, len(model.graph.node)))
    unseal(model, sealed)
    return model, counts


def original_of(path: Path) -> Path:
    """Where `surgery optimize` keeps a graph as it was before its first optimization."""
    return path.with_name(path.name.removesuffix(".onnx") + ORIGINAL_SUFFIX)


def optimize_graph(path: Path, names: list[str], graph: GraphSpec, vocab: int, check: bool,
                   keep: Output | None = None) -> tuple[GraphReport, Path | None]:
    """The optimized graph written beside `path` (returned, for journal.commit), or None when no pass
    changed it. External weights are never touched."""
    original = load_structure(path)
    model, counts = _passes(onnx.ModelProto.FromString(original.SerializeToString()), names)
    if not any(sites for _, sites, _ in counts):
        return GraphReport(graph.name, counts, None), None
    tmp = path.with_name(f".{path.name}.opt.tmp")
    try:
        save_graph(model, tmp)
        cosine = None
        if check:
            feeds = random_inputs(graph, vocab)
            want = _outputs(path, feeds)
            cosine = _worst(_outputs(tmp, feeds), want)
            if not cosine >= MIN_COSINE:
                _blame(original, names, path, tmp, feeds, want, graph.name, cosine)
        if keep is not None and not original_of(path).exists():
            keep.add(original_of(path).name)
            save_graph(original, original_of(path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GraphReport(graph.name, counts, cosine), tmp


def _blame(original: onnx.ModelProto, names: list[str], path: Path, tmp: Path, feeds: dict, want: list,
           graph: str, cosine: float) -> None:
    """Replay the pipeline one pass at a time and name the first pass that changes the outputs."""
    for i, name in enumerate(names):
        model, _ = _passes(onnx.ModelProto.FromString(original.SerializeToString()), names[: i + 1])
        save_graph(model, tmp)
        if not _worst(_outputs(tmp, feeds), want) >= MIN_COSINE:
            raise SurgeryError(f"{graph}: pass {name} changes the outputs (cosine {cosine:.6f}); "
                               f"rerun with --skip {name}")
    raise SurgeryError(f"{graph}: the pipeline changes the outputs (cosine {cosine:.6f}) though no single "
                       "prefix of it does; rerun with --no-check to inspect")


def move_final_norm(directory: Path, manifest: Manifest, check: bool, keep: Output | None) -> dict | None:
    """Run the final-norm move (passes/final_norm.py) and check last block -> head end to end."""
    rewritten = final_norm.plan(directory, manifest)
    if rewritten is None:
        return None
    temps = {name: directory / f".{manifest.graph(name).file}.norm.tmp" for name in rewritten}
    try:
        for name, model in rewritten.items():
            save_graph(model, temps[name])
        worst = None
        if check:
            head_old, head_new = manifest.graph("lm_head"), temps["lm_head"]
            for g in final_norm.last_graphs(manifest):
                if g.name == "lm_head":
                    continue
                feeds = random_inputs(g, manifest.vocab_size)
                want = _outputs(directory / head_old.file,
                                {"hidden_states": _outputs(directory / g.file, feeds)[0][0, -1:]})
                got = _outputs(head_new, {"hidden_states": _outputs(temps[g.name], feeds)[0][0, -1:]})
                cosine = _worst(got, want)
                worst = cosine if worst is None else min(worst, cosine)
                if not cosine >= MIN_COSINE:
                    raise SurgeryError(f"moving the final norm into {g.name} changes the logits (cosine "
                                       f"{cosine:.6f}); rerun with --no-check to inspect")
        for name in rewritten:
            path = directory / manifest.graph(name).file
            if keep is not None and not original_of(path).exists():
                keep.add(original_of(path).name)
                save_graph(load_structure(path), original_of(path))
        journal.commit(directory, manifest, temps, {"final_norm": "last_block"})
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return {"into": sorted(n for n in rewritten if n != "lm_head"), "cosine": worst}


def optimize_dir(directory: Path, target: str, passes: list[str] | None = None, skip: tuple[str, ...] = (),
                 keep: bool = True, check: bool | str = True,
                 progress: Callable[[str], None] = lambda name: None) -> list[GraphReport]:
    """`check`: True/"all" checks every changed graph, "sample" the graphs compile/checks.py samples."""
    directory = Path(directory)
    owned = adopt(directory, ("export",), "surgery optimize")
    journal.recover(directory)  # a run killed mid-commit is finished first
    manifest = Manifest.read(directory)
    names = pipeline(target, passes, skip)
    level = {True: "all", False: "none"}.get(check, check)
    if level != "none":
        manifest.require_numpy_dtype("the parity check of surgery optimize (use --no-check)")
    checked = {g.name for g in sampled(manifest, level)}
    reports = []
    gc.collect()
    gc.freeze()  # what is alive now (torch's, transformers' objects) is not walked by the collections below
    try:
        for graph in manifest.graphs:
            progress(graph.name)
            path = directory / graph.file
            report, new = optimize_graph(path, names, graph, manifest.vocab_size, graph.name in checked,
                                         owned if keep else None)
            reports.append(report)
            if new is not None:
                journal.commit(directory, manifest, {graph.name: new})
            gc.collect()  # passes copy graphs several times; give the memory back before the next one
    finally:
        gc.unfreeze()
    moved = None
    if TARGETS[target].get("final_norm") == "last_block":
        moved = move_final_norm(directory, manifest, level != "none", owned if keep else None)
    manifest.opset = max(opset_of(load_structure(directory / g.file)) for g in manifest.graphs)
    manifest.optimizations.append({
        "target": target, "passes": names, "checked": level,
        "graphs": {r.graph: {"counts": [list(c) for c in r.counts], "cosine": r.cosine} for r in reports},
        **({"final_norm": moved} if moved else {}),
    })
    manifest.write(directory)
    return reports
