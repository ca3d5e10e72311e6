"""A full or read-only disk, and kill -9 in the middle of a stage: one line, nothing half-written, and a
rerun that finishes with the same files a clean run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from adversarial.guards import Guard

from surgery.compile.toolchains import installed

SURGERY = str(Path(sys.executable).with_name("surgery"))


@contextmanager
def mounted(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `path` (root only; the test skips where mounting is not allowed)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(reason=f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_during_export(cli, bundle_src: Path, tmp_path: Path):
    with mounted(tmp_path / "small", "size=600k") as small:
        result = cli("export", bundle_src.parent / "patched", "--out", small / "o", "--seq-length", "16",
                     "--trust-remote-code")
        result.one_line_error("no space left on the device")
        leftovers = [p.name for p in (small / "o").rglob("*") if p.name.endswith(".tmp") or "staging" in p.name]
        assert leftovers == [] and not (small / "o" / "manifest.json").exists()


def test_read_only_output(cli, world: Path, tmp_path: Path):
    with mounted(tmp_path / "ro", "ro,size=1m") as ro:
        guard = Guard(world / "m")
        cli("apply", "qwen", "--model", world / "m", "--out", ro / "o").one_line_error("read-only")
        guard.unchanged()


def test_real_process_exit_code_and_one_line(world: Path):
    """The console script itself (not the in-process runner): exit 2, one line, no traceback."""
    done = subprocess.run([SURGERY, "apply", "qwen", "--model", str(world / "m"), "--out", str(world),
                           "--force"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "contains the model" in done.stderr
    assert (world / "m" / "model.safetensors").is_file()


def kill_midway(command: list[str], watch: Path, pattern: str, count: int) -> None:
    """Start `command`, SIGKILL it once `count` files matching `pattern` exist under `watch`."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(watch.glob(pattern))) < count:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the command finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_during_optimize_then_rerun(bundle: Path, tmp_path: Path):
    import shutil

    clean = tmp_path / "clean"
    shutil.copytree(bundle, clean)
    subprocess.run([SURGERY, "optimize", str(clean), "--target", "bm1684x"], check=True, capture_output=True)
    kill_midway([SURGERY, "optimize", str(bundle), "--target", "bm1684x"], bundle, "*.original.onnx", 2)
    rerun = subprocess.run([SURGERY, "optimize", str(bundle), "--target", "bm1684x"], capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in bundle.glob(".*.tmp")] == []
    for name in ("block_0.onnx", "block_cache_1.onnx", "lm_head.onnx", "embedding.onnx"):
        assert (bundle / name).read_bytes() == (clean / name).read_bytes(), name


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: `surgery toolchain install mnn`")
def test_kill_9_during_compile_then_rerun(bundle: Path, tmp_path: Path):
    from surgery.runtime import OnnxModel, open_runtime

    out = tmp_path / "mnn"
    command = [SURGERY, "compile", str(bundle), "--chip", "mnn", "-q", "w8bf16", "-o", str(out), "-j", "1",
               "--layout", "graphs"]
    kill_midway(command, out, "*.mnn", 3)
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in out.glob(".*.tmp")] == [] and not list(out.glob(".surgery-staging*"))
    prompt = [5, 17, 42, 7]
    assert open_runtime(out).generate(prompt, 6).tokens == OnnxModel(bundle).generate(prompt, 6).tokens


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: `surgery toolchain install mnn`")
def test_kill_9_during_an_engine_layout_compile_then_rerun(bundle: Path, tmp_path: Path):
    """MNN's engine layout (the default): killed while the engine graph is being built, a rerun finishes and
    leaves no temporary files; MNN's engine then generates from it."""
    from surgery.runtime import open_runtime

    out = tmp_path / "engine"
    command = [SURGERY, "compile", str(bundle), "--chip", "mnn", "-q", "w8bf16", "-o", str(out)]
    kill_midway(command, out, "logs/llm.log", 1)
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in out.glob(".*.tmp")] == [] and not list(out.glob(".surgery-staging*"))
    assert len(open_runtime(out).generate([5, 17, 42, 7], 6).tokens) == 6
