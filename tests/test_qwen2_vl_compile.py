"""The Qwen2-VL fixture's graphs, vision graph included, compiled for bm1684x at F16 (checked on TPU-MLIR's CPU
simulator) and for MNN's per-graph layout, each against onnxruntime (the issue's bar for the vision graph:
cosine >= 0.999)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pack_qwen2_5_vl import vl25  # noqa: F401  (module fixture: the exported tiny Qwen2.5-VL)
from test_pack_qwen2_vl import vl  # noqa: F401  (module fixture: the exported tiny Qwen2-VL)

from surgery.compile.base import CompileOptions
from surgery.compile.mnn import ADAPTER as MNN
from surgery.compile.sophgo import ADAPTER as SOPHGO
from surgery.compile.sophgo_graphs import deploy_flags
from surgery.compile.toolchains import installed


def test_vision_graph_deploys_as_a_float_net():
    graph = type("G", (), {"kind": "vision"})()
    assert deploy_flags(graph, CompileOptions("bm1684x", quantize="f16"))[:2] == ["--quantize", "F16"]
    assert deploy_flags(graph, CompileOptions("bm1684x", quantize="w4bf16"))[:2] == ["--quantize", "BF16"]


@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                    "`surgery toolchain install sophgo` (make toolchains)")
@pytest.mark.parametrize("family, fixture", [("qwen2_vl", "vl"), ("qwen2_5_vl", "vl25")])
def test_vision_graph_on_the_bm1684x_simulator(family, fixture, request, tmp_path: Path):
    vl = request.getfixturevalue(fixture)  # noqa: F811
    manifest = SOPHGO.compile(vl["onnx"], tmp_path / "out", CompileOptions("bm1684x", quantize="f16",
                                                                         check="sample"))
    assert (tmp_path / "out" / f"{family}_f16_seq64_1dev.bmodel").is_file()
    rows = {(r["graph"], r["output"]): r for r in manifest.compiled.parity}
    assert rows[("vision", "image_embeds")]["cosine"] >= 0.999
    assert manifest.compiled.details["routes"]["vision"]["deploy"][:2] == ["--quantize", "F16"]
    assert manifest.vision == vl_manifest_vision(vl)


def vl_manifest_vision(vl) -> dict:  # noqa: F811
    from surgery.manifest import Manifest

    return Manifest.read(vl["onnx"]).vision


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
@pytest.mark.parametrize("fixture", ["vl", "vl25"])
def test_vision_graph_through_mnn(fixture, request, tmp_path: Path):
    """MNN's LLM engine layout has no place for a vision tower (and no engine spec for qwen2_vl yet): the per-graph
    layout converts every graph, vision.mnn included."""
    vl = request.getfixturevalue(fixture)  # noqa: F811
    manifest = MNN.compile(vl["onnx"], tmp_path / "out", CompileOptions("mnn", quantize="f16", layout="graphs"))
    assert (tmp_path / "out" / "vision.mnn").is_file()
    rows = {(r["graph"], r["output"]): r for r in manifest.compiled.parity}
    assert rows[("vision", "image_embeds")]["cosine"] >= 0.999
