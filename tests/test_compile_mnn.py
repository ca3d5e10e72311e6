"""MNN adapter, per-graph layout (`--layout graphs`): real MNNConvert of the fixture export, every graph checked
against onnxruntime on the MNN runtime, generation on MNN, and no package installed behind the user's back.
The default layout, MNN's LLM engine, is tested in test_mnn_llm.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import export_native

from surgery.checks import DELTA
from surgery.compile.base import CompileOptions
from surgery.compile.mnn import ADAPTER as MNN
from surgery.compile.toolchains import installed
from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file
from surgery.manifest import Manifest
from surgery.runtime import OnnxModel, open_runtime

Q = {None: "fp32", 8: "w8bf16", 4: "w4bf16"}  # -q for float, 8- and 4-bit weights
NO_MNN = "MNN toolchain absent: run `surgery toolchain install mnn` (make toolchains)"
pytestmark = pytest.mark.skipif(installed("mnn") is None, reason=NO_MNN)
SURGERY = str(Path(sys.executable).with_name("surgery"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_native("llama", tmp_path_factory.mktemp("mnn"))


@pytest.mark.parametrize("bits,floor", [(None, 0.9999), (8, 0.99), (4, 0.95)])
def test_compile_checks_every_graph(onnx_dir: Path, tmp_path: Path, bits: int | None, floor: float):
    manifest = MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", Q[bits], 32, check="all", layout="graphs"))
    rows = manifest.compiled.parity
    assert {r["graph"] for r in rows} == {g.name for g in manifest.graphs}
    assert min(r["cosine"] for r in rows if r["output"] == "hidden_states") >= floor
    assert len([r for r in rows if r["output"] == DELTA]) == 4  # what each block adds, beside its output
    assert all((tmp_path / "mnn" / g.file).is_file() for g in manifest.graphs)
    assert manifest.backend == "mnn" and manifest.compiled.details["weight_quant_bits"] == bits


def test_mnn_generates_what_onnxruntime_generates(onnx_dir: Path, tmp_path: Path):
    MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", "w8bf16", 32, layout="graphs"))
    prompt = [5, 17, 42, 7, 99, 3]
    model = open_runtime(tmp_path / "mnn")
    got = model.generate(prompt, 16)
    assert got.tokens == OnnxModel(onnx_dir).generate(prompt, 16).tokens
    assert got.decode_tokens_per_s > 0


def test_cli_compile_installs_nothing(onnx_dir: Path, tmp_path: Path):
    """MNN's Python tools pip-install a package at import; a failing `pip` on PATH must never be called."""
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "pip-was-called"
    for name in ("pip", "pip3"):
        (fake / name).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([SURGERY, "compile", str(onnx_dir), "--chip", "mnn", "-q", "w8bf16", "--layout", "graphs",
                           "-o", str(tmp_path / "out"), "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    ran = subprocess.run([SURGERY, "run", str(tmp_path / "out"), "--backend", "mnn", "--prompt", "Hello",
                          "--max-new-tokens", "4", "--json"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    assert '"backend": "mnn"' in ran.stdout and '"text": "' in ran.stdout
    assert not marker.exists()


def test_converter_failure_names_graph_command_and_log(onnx_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "lm_head.onnx").write_bytes(b"not a model")
    manifest = Manifest.read(broken, check=False)  # the manifest vouches for it: the converter must fail
    manifest.graph("lm_head").sha256 = sha256_file(broken / "lm_head.onnx")
    manifest.write(broken)
    with pytest.raises(SurgeryError) as err:
        MNN.compile(broken, tmp_path / "out", CompileOptions("mnn", jobs=1, layout="graphs"))
    message = str(err.value)
    assert "MNNConvert of graph lm_head failed" in message and "command: " in message
    assert f"last 30 lines of {tmp_path / 'out' / 'logs' / 'lm_head.log'}" in message


def test_missing_toolchain_is_one_line(onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path / "empty"))
    with pytest.raises(SurgeryError, match=r"the mnn toolchain is not installed; run `surgery toolchain install mnn`"):
        MNN.compile(onnx_dir, tmp_path / "out", CompileOptions("mnn"))
