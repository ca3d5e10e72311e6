"""Axera adapter: the build kit is exact on paper (configs valid against the documented schema, calibration
from real activations, I/O in the runtime's names), and `pulsar2` runs it when one is on PATH."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import export_native, generic_copy

from surgery.compile.axera import ADAPTER as AXERA
from surgery.compile.base import CompileOptions
from surgery.contract import random_inputs
from surgery.errors import SurgeryError
from surgery.manifest import Manifest

FAKE = Path(__file__).with_name("fakes") / "pulsar2.py"


@pytest.fixture
def fake_pulsar2(tmp_path: Path) -> Path:
    """A `pulsar2` on PATH that runs the stand-in with this interpreter (it needs onnx and numpy)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "pulsar2").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    (bin_dir / "pulsar2").chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_native("qwen2", tmp_path_factory.mktemp("axera"))


def test_kit_without_pulsar2(onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    kit = AXERA.compile(onnx_dir, tmp_path / "kit", CompileOptions("ax650"))
    out = tmp_path / "kit"
    assert kit.compiled.details["built"] is False and (out / "build.sh").stat().st_mode & 0o111
    lines = [line for line in (out / "build.sh").read_text().splitlines() if line.startswith("pulsar2")]
    assert len(lines) == 5 and all("--target_hardware AX650" in line for line in lines)
    decode = next(g for g in kit.compiled.details["graphs"] if g["graph"] == "block_cache_0")
    assert decode["inputs"] == ["input", "indices", "mask", "K_cache", "V_cache"]
    assert decode["outputs"] == ["output", "K_cache_out", "V_cache_out"]
    assert decode["samples"] == 4 * 7  # 4 prompts x 7 decode steps after each prefill
    post = next(g for g in kit.compiled.details["graphs"] if g["graph"] == "lm_head")
    assert post["name"] == "qwen2_post" and post["inputs"] == ["input"]
    # calibration data are real activations: positions advance, masks open one slot per step
    with tarfile.open(out / "calib" / f"{decode['name']}.indices.tar") as tar:
        positions = [int(np.load(io.BytesIO(tar.extractfile(m).read())).reshape(-1)[0]) for m in tar.getmembers()]
    assert len(set(positions)) > 5
    table = np.fromfile(out / "qwen2.embed_tokens.bf16.bin", dtype="<u2")
    assert table.size == 512 * 64


def test_renamed_graphs_compute_the_same(onnx_dir: Path, tmp_path: Path):
    AXERA.compile(onnx_dir, tmp_path / "kit", CompileOptions("ax650"))
    manifest = Manifest.read(onnx_dir)
    for graph in (manifest.graph("block_cache_1"), manifest.graph("block_0"), manifest.graph("lm_head")):
        name = "qwen2_post" if graph.name == "lm_head" else \
            f"qwen2_p32_l{graph.layer}_{'prefill' if graph.kind == 'block' else 'decode'}"
        renamed = onnx.load(str(tmp_path / "kit" / "onnx" / f"{name}.onnx"))
        feeds = random_inputs(graph, manifest.vocab_size)
        want = ort.InferenceSession(str(onnx_dir / graph.file)).run(None, feeds)
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in renamed.graph.input}
        axera_feeds = {new: feeds[old].reshape(shapes[new]).astype(np.uint32 if new == "indices" else feeds[old].dtype)
                       for old, new in zip([t.name for t in graph.inputs], shapes, strict=True)}
        got = ort.InferenceSession(renamed.SerializeToString()).run(None, axera_feeds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.reshape(w.shape), w, rtol=0, atol=1e-6)


def test_pulsar2_on_path_builds_every_graph(onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           fake_pulsar2: Path):
    monkeypatch.setenv("PATH", f"{fake_pulsar2}{os.pathsep}{os.environ['PATH']}")
    kit = AXERA.compile(onnx_dir, tmp_path / "kit", CompileOptions("ax630c"))
    assert kit.compiled.details["built"] is True
    calls = (tmp_path / "kit" / "build" / "calls.txt").read_text().splitlines()
    assert len(calls) == 5 and all("--target_hardware AX620E" in c for c in calls)
    config = json.loads((tmp_path / "kit" / "configs" / "qwen2_p32_l0_prefill.json").read_text())
    assert config["npu_mode"] == "NPU2" and config["quant"]["input_configs"][0]["calibration_format"] == "Numpy"


def test_fake_pulsar2_rejects_a_bad_config(onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           fake_pulsar2: Path):
    """The stand-in really validates: a config with an unknown npu mode fails the build with the log."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    AXERA.compile(onnx_dir, tmp_path / "kit", CompileOptions("ax650"))
    config_path = tmp_path / "kit" / "configs" / "qwen2_p32_l0_prefill.json"
    config = json.loads(config_path.read_text())
    config["npu_mode"] = "NPU9"
    config_path.write_text(json.dumps(config))
    done = subprocess.run([str(fake_pulsar2 / "pulsar2"), "build", "--input", config["input"], "--output_dir",
                           config["output_dir"], "--config", str(config_path), "--target_hardware", "AX650"],
                          cwd=tmp_path / "kit", capture_output=True, text=True)
    assert done.returncode == 1 and "npu_mode NPU9 invalid" in done.stdout


def test_refuses_opset23_graphs(onnx_dir: Path, tmp_path: Path):
    generic = generic_copy(onnx_dir, tmp_path / "generic")
    with pytest.raises(SurgeryError, match="--target ax650"):
        AXERA.compile(generic, tmp_path / "kit", CompileOptions("ax650"))


def test_build_script_puts_models_where_the_runtime_config_looks(onnx_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, fake_pulsar2: Path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    AXERA.compile(onnx_dir, tmp_path / "kit", CompileOptions("ax650"))
    kit = tmp_path / "kit"
    env = {**os.environ, "PATH": f"{fake_pulsar2}{os.pathsep}/usr/bin:/bin"}
    subprocess.run(["./build.sh"], cwd=kit, env=env, check=True, capture_output=True)
    config = json.loads((kit / "config.json").read_text())
    assert (kit / config["filename_post_axmodel"]).is_file()
    for layer in range(config["axmodel_num"]):
        stem = config["template_filename_axmodel"].replace("%d", str(layer)).removesuffix("_together.axmodel")
        # the halves sit beside the name the runtime loads; joining them is the open step (docs/axera.md)
        assert all((kit / f"{stem}_{half}.axmodel").is_file() for half in ("prefill", "decode"))


def test_a_scaled_embedding_is_not_taken_for_its_table(tmp_path: Path):
    """MiniCPM's embedding graph multiplies the rows (scale_emb): the kit's raw table would silently drop it."""
    from onnx import TensorProto, helper, numpy_helper

    from surgery.onnxio import table_of

    table = numpy_helper.from_array(np.ones((8, 4), np.float32), "table")
    scale = numpy_helper.from_array(np.array(12.0, np.float32), "scale")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("Mul", ["rows", "scale"], ["y"])]
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4])], [table, scale])
    onnx.save(helper.make_model(graph), tmp_path / "scaled.onnx")
    with pytest.raises(SurgeryError, match=r"does more than look rows up \(Mul\)"):
        table_of(tmp_path / "scaled.onnx")
    onnx.save(helper.make_model(helper.make_graph(nodes[:1], "embedding", graph.input, [
        helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 2, 4])], [table])), tmp_path / "plain.onnx")
    assert table_of(tmp_path / "plain.onnx").shape == (8, 4)
