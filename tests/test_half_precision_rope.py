"""`--dtype fp16` on a transformers-native family: the rotary tables are built in the blocks' dtype, as the
model's rotary module returns them at run time (a float32 table promoted q/k to float32 and the export failed
with a dtype mismatch in the attention's matmul)."""

from __future__ import annotations

from surgery.apply import plan_apply, write_plan
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.fixtures.native import build_native
from surgery.manifest import Manifest
from surgery.packs import ApplyOptions, get_pack


def test_native_family_exports_and_verifies_at_fp16(tmp_path):
    src = build_native("qwen2", tmp_path / "src")
    write_plan(plan_apply(get_pack("qwen2"), src, ApplyOptions(seq_length=32, dtype="fp16")), tmp_path / "patched")
    export_model(tmp_path / "patched", tmp_path / "onnx", ExportOptions(seq_length=32, dtype="fp16",
                                                                        trust_remote_code=True))
    assert Manifest.read(tmp_path / "onnx").graph("block_0").inputs[0].dtype == "float16"
    assert min(r.cosine for r in verify_export(tmp_path / "onnx", trust_remote_code=True)) >= 0.999
