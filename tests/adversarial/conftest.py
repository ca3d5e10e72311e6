"""Shared pieces of the adversarial suite: the CLI in-process (as `main()` runs it: one line, exit 2), a
guard that proves nothing of the input or beside it changed, and small model/bundle fixtures."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from adversarial.guards import Result

from surgery.apply import plan_apply, write_plan
from surgery.export.exporter import ExportOptions, export_model
from surgery.fixtures.qwen_v1 import build
from surgery.packs import ApplyOptions, get_pack

SEQ = 16


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run `surgery ARGS...` in this process, through the same `main()` the console script calls."""
    from surgery import cli as cli_module

    monkeypatch.setenv("COLUMNS", "400")  # one logical line stays one printed line

    def run(*args: str, cwd: Path | None = None) -> Result:
        old = os.getcwd()
        monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
        if cwd:
            os.chdir(cwd)
        try:
            cli_module.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            os.chdir(old)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def world(tmp_path: Path, model_src: Path) -> Path:
    """A fresh copy of the tiny model at `world/m`, with a sentinel directory `world/sentinel` beside it."""
    shutil.copytree(model_src, tmp_path / "m", symlinks=True)
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_text("a bystander's file")
    return tmp_path


@pytest.fixture(scope="session")
def model_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("adv") / "model", revision="2023-12", seed=0)


@pytest.fixture(scope="session")
def bundle_src(model_src: Path) -> Path:
    """A patched model and its export (SEQ), built once; tests copy the export before touching it."""
    root = model_src.parent
    write_plan(plan_apply(get_pack("qwen"), model_src, ApplyOptions(seq_length=SEQ, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    return root / "onnx"


@pytest.fixture
def bundle(tmp_path: Path, bundle_src: Path) -> Path:
    out = tmp_path / "onnx"
    shutil.copytree(bundle_src, out)
    (tmp_path / "sentinel").mkdir(exist_ok=True)
    (tmp_path / "sentinel" / "keep.txt").write_text("a bystander's file")
    return out
