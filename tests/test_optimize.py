"""Graph passes on the real exports of every fixture family: each pass keeps onnxruntime outputs, the
generic pipeline beats onnxslim alone, and optimized directories still generate the same tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from surgery.apply import plan_apply, write_plan
from surgery.contract import random_inputs
from surgery.errors import SurgeryError
from surgery.export.exporter import ExportOptions, export_model
from surgery.fixtures.native import build_native
from surgery.fixtures.qwen_v1 import build
from surgery.manifest import Manifest
from surgery.optimize import optimize_dir
from surgery.packs import ApplyOptions, get_pack
from surgery.parity import compare
from surgery.passes import PASSES, run_pass
from surgery.passes.testing import run
from surgery.runtime import OnnxModel

FAMILIES = ["qwen", "llama", "qwen3", "phi3"]
SEQ = 32


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    src = build(root / "src", revision="2023-12") if family == "qwen" else build_native(family, root / "src")
    write_plan(plan_apply(get_pack(family), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    return root / "onnx"


def test_every_pass_keeps_every_graph(exported: Path):
    manifest = Manifest.read(exported)
    applied = set()
    for graph in manifest.graphs:
        model = onnx.load(str(exported / graph.file))
        feeds = random_inputs(graph, manifest.vocab_size)
        want = run(model, feeds)
        for name, p in PASSES.items():
            out, sites = run_pass(model, p)
            if not sites:
                assert out is model or out.SerializeToString() == model.SerializeToString(), name
                continue
            applied.add(name)
            for got, ref in zip(run(out, feeds), want, strict=True):
                assert compare(graph.name, name, got, ref).cosine >= 0.99999, (graph.name, name)
    assert {"slim", "rotate_half", "rmsnorm", "rmsnorm17"} <= applied


def test_generic_decode_block_beats_onnxslim(exported: Path):
    path = exported / "block_cache_0.onnx"
    slim_only = len(PASSES["slim"].fn(onnx.load(str(path)))[0].graph.node)
    reports = optimize_dir(_copy(exported, "generic"), "generic")
    ours = next(r for r in reports if r.graph == "block_cache_0").counts[-1][2]
    assert ours <= 0.75 * slim_only, (ours, slim_only)


def _copy(src: Path, name: str) -> Path:
    dst = src.with_name(name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("target", ["generic", "bm1684x"])
def test_optimized_directory_generates_the_same_tokens(exported: Path, target: str):
    out = _copy(exported, f"opt-{target}")
    prompt = [5, 17, 42, 7, 99, 3]
    want = OnnxModel(exported).generate(prompt, 16).tokens
    optimize_dir(out, target)
    manifest = Manifest.read(out)
    assert OnnxModel(out).generate(prompt, 16).tokens == want
    assert manifest.optimizations[-1]["target"] == target
    assert manifest.opset == (23 if target == "generic" else 17)
    originals = sorted(p.name for p in out.glob("*.original.onnx"))
    assert originals and set(originals) <= {g.file.replace(".onnx", ".original.onnx") for g in manifest.graphs}
    for name in originals:  # each original runs beside its optimized graph, on the same data file
        graph = manifest.graph(name.removesuffix(".original.onnx"))
        feeds = random_inputs(graph, manifest.vocab_size)
        want = ort.InferenceSession(str(exported / graph.file), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"]).run(None, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), name
    record = manifest.optimizations[-1]["graphs"]["block_cache_0"]
    assert record["cosine"] >= 0.99999 and record["counts"][0][0] == "input"


def test_bad_optimize_input(exported: Path):
    with pytest.raises(SurgeryError, match="unknown target 'tpu'"):
        optimize_dir(exported, "tpu")
    with pytest.raises(SurgeryError, match="no pass named 'fuse_everything'"):
        optimize_dir(exported, "generic", passes=["fuse_everything"])
    assert json.loads((exported / "manifest.json").read_text())["optimizations"] == []


def test_run_once_returns_arrays_that_hold_no_session(tmp_path: Path):
    """onnxruntime's outputs are views keeping the session's buffers alive (at 7B a 2.5 GB head table per
    logits array, 9.1 GB in optimize's final-norm check); run_once hands back owned copies."""
    from onnx import TensorProto, helper, numpy_helper

    from surgery.onnxio import ort_session, run_once

    weight = numpy_helper.from_array(np.arange(64 * 8, dtype=np.float32).reshape(64, 8), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    feeds = {"x": np.ones((1, 64), np.float32)}
    raw = ort_session(tmp_path / "g.onnx").run(None, feeds)[0]
    (out,) = run_once(tmp_path / "g.onnx", feeds)
    assert raw.base is not None  # what the copy guards against: the runtime's array borrows its memory
    assert out.base is None and out.flags.owndata
    np.testing.assert_array_equal(out, raw)
