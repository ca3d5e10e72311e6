"""Test helpers shared by several modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgery.apply import plan_apply, write_plan
from surgery.packs import ApplyOptions, get_pack


def export_native(family: str, root: Path, seq: int = 32, **overrides: object) -> Path:
    """Build a tiny `family` model, apply its pack, export it; return the export directory."""
    from surgery.export.exporter import ExportOptions, export_model
    from surgery.fixtures.native import build_native

    src = build_native(family, root / "src", **overrides)
    write_plan(plan_apply(get_pack(family), src, ApplyOptions(seq_length=seq, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=seq, trust_remote_code=True))
    return root / "onnx"


def generic_copy(onnx_dir: Path, dst: Path) -> Path:
    """A copy of an export optimized for the generic target (opset 23 graphs)."""
    import shutil

    from surgery.optimize import optimize_dir

    shutil.copytree(onnx_dir, dst)
    optimize_dir(dst, "generic", keep=False)
    return dst


def decode_mnn_linear(raw: bytes, external: list[int], oc: int, ic: int, bits: int,
                      block: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight [oc, ic] and bias of one linear in MNN's block storage, by the rules MNN's loaders follow
    (written out here, not taken from compile/mnn_weights.py): values `q + 2^(b-1)` packed high bits first,
    row-major, after the header; fp32 scales per (row, block), asymmetric pairs (zero, scale) with
    w = (v - 2^(b-1)) * scale + zero; then the fp32 bias."""
    start, weight_bytes, scale_bytes, bias_bytes, _ = external
    values = np.frombuffer(raw, np.uint8, oc * ic * bits // 8, start + weight_bytes - oc * ic * bits // 8)
    if bits == 4:
        values = np.stack([values >> 4, values & 15], -1).reshape(-1)
    v = values.reshape(oc, ic // block, block).astype(np.float32) - (1 << (bits - 1))
    alpha = np.frombuffer(raw, "<f4", scale_bytes // 4, start + weight_bytes).reshape(oc, ic // block, -1)
    w = v * alpha[..., -1:] + (alpha[..., :1] if alpha.shape[-1] == 2 else 0)
    bias = np.frombuffer(raw, "<f4", bias_bytes // 4, start + weight_bytes + scale_bytes)
    return w.reshape(oc, ic), bias


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`surgery ARGS...` in this process: (exit code, stdout, stderr), with wide columns for rich's output."""
    import sys

    from surgery import cli as cli_module

    capsys.readouterr()  # what fixtures printed before the command
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
    try:
        cli_module.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
