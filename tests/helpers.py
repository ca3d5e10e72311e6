"""Test helpers shared by several modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

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
