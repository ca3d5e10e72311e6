"""Per-block ONNX export (installed as `surgery.export`); see issue 3 and docs/ for the block contract."""
