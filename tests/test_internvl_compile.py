"""The InternVL fixture's graphs, vision graph (InternViT + pixel shuffle + mlp1) included, compiled for MNN's
per-graph layout and for bm1684x at F16 (TPU-MLIR's CPU simulator), each against onnxruntime (the issue's bar
for the vision graph: cosine >= 0.999). The bm1684x build takes ~40 s on 2 cores, so it is marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.apply import plan_apply, write_plan
from surgery.compile.base import CompileOptions
from surgery.compile.mnn import ADAPTER as MNN
from surgery.compile.sophgo import ADAPTER as SOPHGO
from surgery.compile.toolchains import installed
from surgery.export.exporter import ExportOptions, export_model
from surgery.packs import ApplyOptions, get_pack

SEQ = 128


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    from surgery.fixtures.internvl import build

    root = tmp_path_factory.mktemp("internvl-compile")
    write_plan(plan_apply(get_pack("internvl"), build(root / "src"), ApplyOptions(seq_length=SEQ, dtype="fp32")),
               root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    return root / "onnx"


def _vision_cosine(manifest) -> float:
    return {(r["graph"], r["output"]): r for r in manifest.compiled.parity}[("vision", "image_embeds")]["cosine"]


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_vision_graph_through_mnn(onnx_dir, tmp_path):
    manifest = MNN.compile(onnx_dir, tmp_path / "out", CompileOptions("mnn", quantize="f16", layout="graphs"))
    assert (tmp_path / "out" / "vision.mnn").is_file()
    assert _vision_cosine(manifest) >= 0.999 and manifest.vision["pixel_layout"] == "NCHW"


@pytest.mark.slow
@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                    "`surgery toolchain install sophgo` (make toolchains)")
def test_vision_graph_on_the_bm1684x_simulator(onnx_dir, tmp_path):
    manifest = SOPHGO.compile(onnx_dir, tmp_path / "out", CompileOptions("bm1684x", quantize="f16", check="sample"))
    assert (tmp_path / "out" / f"internvl_chat_f16_seq{SEQ}_1dev.bmodel").is_file()
    assert _vision_cosine(manifest) >= 0.999
    assert manifest.compiled.details["routes"]["vision"]["deploy"][:2] == ["--quantize", "F16"]
