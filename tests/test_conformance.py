"""Every pack, on a tiny fixture of its family: apply -> load -> logits parity -> export -> per-graph parity
-> 32 greedy tokens from `run` identical to the original transformers model."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.apply import read_config
from surgery.conformance import check_pack
from surgery.fixtures import baichuan, chatglm, internlm2, minicpm
from surgery.fixtures.native import FAMILIES, build_native
from surgery.fixtures.qwen_v1 import REVISIONS, build
from surgery.packs import all_packs, resolve_pack

CASES = [*(("qwen", revision) for revision in REVISIONS), *(("chatglm", r) for r in chatglm.REVISIONS),
         *(("internlm2", r) for r in internlm2.REVISIONS), *(("minicpm", r) for r in minicpm.REVISIONS),
         *(("baichuan", r) for r in baichuan.REVISIONS),
         *((family, None) for family in FAMILIES)]
# remote-code families, built per revision style
BUILDERS = {"qwen": build, "chatglm": chatglm.build, "internlm2": internlm2.build, "minicpm": minicpm.build,
            "baichuan": baichuan.build}


def test_every_pack_has_a_case():
    own_tests = {p.stem.removeprefix("test_pack_") for p in Path(__file__).parent.glob("test_pack_*.py")}
    assert {pack for pack, _ in CASES} | own_tests == set(all_packs())


@pytest.mark.parametrize("pack,revision", CASES, ids=[f"{p}-{r}" if r else p for p, r in CASES])
def test_apply_auto_picks_the_pack(pack: str, revision: str | None, tmp_path: Path):
    """`surgery apply auto` on each fixture (every revision style) chooses that family's pack."""
    src = BUILDERS[pack](tmp_path / "src", revision=revision) if revision else build_native(pack, tmp_path / "src")
    assert resolve_pack("auto", read_config(src)[0]).name == pack


@pytest.mark.parametrize("pack,revision", CASES, ids=[f"{p}-{r}" if r else p for p, r in CASES])
def test_pack_conformance(pack: str, revision: str | None, tmp_path: Path):
    src = BUILDERS[pack](tmp_path / "src", revision=revision) if revision else build_native(pack, tmp_path / "src")
    report = check_pack(pack, src, tmp_path / "work")
    assert report.logits_max_abs < 1e-5, report.logits_max_abs
    assert report.worst.cosine >= 0.99999, report.worst
    assert len(set(report.reference)) >= 8, "fixture too degenerate for a token test"
    assert report.tokens == report.reference
    if pack not in BUILDERS:  # remote code keeps tuple caches, which generate() in transformers 5 rejects
        assert report.generated == report.tokens  # transformers' own greedy generate()
