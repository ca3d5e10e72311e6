"""The streaming combine writes the bytes `model_tool --combine` writes (apart from the create-time stamp),
without holding the nets' binaries, and refuses a damaged bmodel with one clear error."""

from __future__ import annotations

import re
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from helpers import export_native

from surgery.compile import bmodel_combine
from surgery.compile.base import CompileOptions
from surgery.compile.bmodel_combine import HEADER, combine, read_bmodel
from surgery.compile.bmodel_fbs import Binary, binary_slots
from surgery.compile.toolchains import bin_env, installed
from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file

needs_tpu_mlir = pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent")
STAMP = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")  # bmodel "create time"


def unstamped(path: Path) -> bytes:
    return STAMP.sub(lambda m: b"#" * len(m.group()), path.read_bytes())


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """The per-graph bmodels of a compiled llama fixture (static and dynamic nets, a table two nets share),
    and the bundle's combined bmodel."""
    from surgery.compile.sophgo import ADAPTER as SOPHGO
    from surgery.compile.sophgo import cache_dir

    root = tmp_path_factory.mktemp("combine")
    onnx_dir = export_native("llama", root / "model", 16, initializer_range=0.02)
    manifest = SOPHGO.compile(onnx_dir, root / "out", CompileOptions("bm1684x", "w4bf16", 32, check="none"))
    keys = [route["cache_key"] for route in manifest.compiled.details["routes"].values()]
    return [cache_dir() / f"{key}.bmodel" for key in keys], root / "out" / manifest.compiled.files[0]


@needs_tpu_mlir
def test_combine_writes_model_tools_bytes(nets: tuple[list[Path], Path], tmp_path: Path):
    inputs, bundled = nets
    reference = tmp_path / "model_tool.bmodel"
    subprocess.run(["model_tool", "--combine", *map(str, inputs), "-o", str(reference)], env=bin_env("sophgo"),
                   check=True, capture_output=True, cwd=tmp_path)
    ours = tmp_path / "ours.bmodel"
    digest = combine(inputs, ours, tmp_path / "work")
    assert digest == sha256_file(ours)  # hashed while written, as the manifest records it
    assert unstamped(ours) == unstamped(reference)
    assert unstamped(bundled) == unstamped(reference)  # what `surgery compile` ships
    assert not list((tmp_path / "work").glob("*.bmodel"))  # stand-ins cleaned up
    _, fb = read_bmodel(ours)
    slots = binary_slots(fb)
    sizes = [Binary.unpack_from(fb, s.pos)[1] for s in slots]
    assert len(inputs) > 5 and max(sizes) > 100_000  # real weights went through, not only commands


@needs_tpu_mlir
def test_combine_streams_the_binaries(nets: tuple[list[Path], Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch):
    inputs, _ = nets
    largest = 0
    for path in inputs:
        _, fb = read_bmodel(path)
        largest = max([largest, *(Binary.unpack_from(fb, s.pos)[1] for s in binary_slots(fb))])
    monkeypatch.setattr(bmodel_combine, "CHUNK", 64 << 10)
    tracemalloc.start()
    try:
        combine(inputs, tmp_path / "ours.bmodel", tmp_path / "work")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(p.stat().st_size for p in inputs)
    assert largest > 1 << 20 and peak < largest / 2 and peak < total / 8, (peak, largest, total)


def test_damaged_bmodels_are_refused_with_one_line(tmp_path: Path):
    bad = tmp_path / "x.bmodel"
    bad.write_bytes(b"not a bmodel at all, just text" * 4)
    with pytest.raises(SurgeryError, match="is not a bmodel"):
        read_bmodel(bad)
    bad.write_bytes(HEADER.pack(bmodel_combine.MAGIC, HEADER.size, 1000, 10**9))
    with pytest.raises(SurgeryError, match="truncated"):
        read_bmodel(bad)
    # a flatbuffer whose root offset points past its end, and one whose vtable offset does
    for fb in (b"\xff\xff\x00\x00" + bytes(60), b"\x08\x00\x00\x00" + bytes(4) + b"\x00\x00\x00\x70" + bytes(20)):
        with pytest.raises(SurgeryError, match="damaged"):
            binary_slots(fb)
