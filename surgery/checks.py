"""Compiled graphs against their ONNX graph on onnxruntime: which graphs to check, and how one is checked.

The default `sample` level runs what is cheap and carries every weight: both embedding nets, every decode
block (one token each; a layer's prefill and decode blocks share its weights and quantization, so a bad
layer shows there) and the head. Prefill blocks run SEQ tokens, which on a chip simulator costs a minute
each at real sizes (more than compiling the whole model), so they are checked at `all`, with the weightless
greedy/sampling heads. On a simulator (`costly`) even a decode block costs seconds to minutes and every
layer is the same graph with other weights, so `sample` there runs the first, a middle and the last
layer's decode block (3 runs at 72B instead of 80); onnxruntime, cheap, still checks every layer in export
and optimize.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from surgery.contract import random_inputs
from surgery.manifest import GraphSpec, Manifest
from surgery.onnxio import run_once
from surgery.parity import Parity, compare
from surgery.table_reference import table_graph_outputs

LEVELS = ("none", "sample", "all")
WEIGHTLESS = ("greedy_head", "sample_head")
DELTA = "hidden_states - input_states"
# one onnxruntime reference at a time per process: checks run on two threads (one per compiler worker), and
# at 7B each reference maps a block's fp32 weights (0.8 GB) beside its working buffers
REFERENCE = threading.Lock()


def sampled(manifest: Manifest, level: str, costly: bool = False) -> list[GraphSpec]:
    """The graphs a check `level` runs; `costly`: each run is a simulator's (see above)."""
    if level == "none":
        return []
    if level == "all":
        return list(manifest.graphs)
    layers = sorted({g.layer for g in manifest.graphs if g.kind == "block_cache"})
    if costly and layers:
        layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    return [g for g in manifest.graphs if g.kind not in (*WEIGHTLESS, "block", "block_cache")
            or (g.kind == "block_cache" and g.layer in layers)]


def bf16_exact(x: np.ndarray) -> np.ndarray:
    """Float inputs rounded to values bf16 (and so f16, in range) holds exactly: a chip that quantizes its
    inputs then sees what onnxruntime sees, and what a block adds is not drowned in input rounding."""
    if x.dtype != np.float32:
        return x
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def check_graph(onnx_dir, graph: GraphSpec, vocab: int,
                run_compiled: Callable[[GraphSpec, dict[str, np.ndarray]], list[np.ndarray]]) -> list[Parity]:
    """One graph: compiled outputs vs onnxruntime on the same contract inputs. For blocks also what the block
    added to its input (the residual dominates `hidden_states`: zeroed weights would still score 0.96)."""
    feeds = {name: bf16_exact(x) for name, x in random_inputs(graph, vocab).items()}
    want = None
    if graph.kind in ("embedding", "embedding_cache", "lm_head"):  # from the table on disk, a slice at a time
        want = table_graph_outputs(onnx_dir / graph.file, feeds)
    if want is None:
        with REFERENCE:
            want = run_once(onnx_dir / graph.file, feeds)
    got = run_compiled(graph, feeds)
    rows = []
    for spec, g, w in zip(graph.outputs, got, want, strict=True):
        g = np.asarray(g).reshape(w.shape)
        rows.append(compare(graph.name, spec.name, g, w))
        if spec.name == "hidden_states" and "input_states" in feeds and g.shape == feeds["input_states"].shape:
            rows.append(compare(graph.name, DELTA, g - feeds["input_states"],
                                w - feeds["input_states"]))
    return rows
