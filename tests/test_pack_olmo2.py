"""Conformance of the `olmo2` pack on a tiny config-built fixture (scaffolded by `surgery port olmo2 --like llama`,
the worked example in docs/porting.md)."""

from pathlib import Path

from surgery.conformance import check_pack
from surgery.fixtures.native import COMMON, build_from_config

# Tiny, GQA, large init range; add the family's own config fields here.
CONFIG = dict(COMMON, model_type="olmo2")


def test_olmo2_conformance(tmp_path: Path):
    src = build_from_config(CONFIG, tmp_path / "src")
    report = check_pack("olmo2", src, tmp_path / "work")
    assert report.logits_max_abs < 1e-5, report.logits_max_abs
    assert report.worst.cosine >= 0.99999, report.worst
    assert len(set(report.reference)) >= 8, "fixture too degenerate for a token test"
    assert report.tokens == report.reference
