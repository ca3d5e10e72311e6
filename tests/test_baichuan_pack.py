"""The baichuan pack on its fixture, beyond the conformance suite: `apply auto` picks it, a second apply changes
nothing, our ALiBi slopes are the fixture's (upstream's formula, including its non-power-of-two branch), and
the head's table is written with its rows normalized, so the exported head is a plain product."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from surgery.apply import plan_apply, read_config, write_plan
from surgery.codemod import Outcome
from surgery.codemod_testing import assert_rule
from surgery.export.arch_baichuan import alibi_slopes, normalize_rows
from surgery.export.tables import Table, row_chunks
from surgery.export.weights import SafetensorsIndex
from surgery.fixtures import baichuan
from surgery.packs import ApplyOptions, get_pack, resolve_pack
from surgery.patches.baichuan import FoldedNormHead


def test_auto_picks_baichuan(tmp_path: Path):
    config = read_config(baichuan.build(tmp_path / "src"))[0]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
    assert resolve_pack("auto", config).name == "baichuan"


@pytest.mark.parametrize("revision", baichuan.REVISIONS)
def test_every_patch_applies_then_reports_already_applied(revision: str, tmp_path: Path):
    src = baichuan.build(tmp_path / "src", revision=revision)
    pack = get_pack("baichuan")
    first = plan_apply(pack, src, ApplyOptions(seq_length=64))
    applied = {r.patch for r in first.results if r.outcome is Outcome.APPLIED}
    style = {"sdpa-off", "rotary-tables"} if revision == "7b" else {"accelerate"}
    assert applied == {"xformers-off", "present-kv", "norm-head", "checkpointing-flag"} | style
    write_plan(first, tmp_path / "out")
    again = plan_apply(pack, tmp_path / "out", ApplyOptions(seq_length=64))
    assert not again.changed
    assert {r.outcome for r in again.results} <= {Outcome.ALREADY_APPLIED, Outcome.NOT_APPLICABLE}


@pytest.mark.parametrize("heads", [6, 8, 40])
def test_alibi_slopes_match_the_fixture(heads: int):
    source = baichuan.render_modeling("13b")
    namespace: dict = {"math": math}
    exec(source[source.index("def _get_interleave"):source.index("def _fill_with_neg_inf")], namespace)
    assert alibi_slopes(heads) == pytest.approx(namespace["_get_interleave"](heads), rel=1e-12)


def test_head_table_rows_are_folded(tmp_path: Path):
    src = baichuan.build(tmp_path / "src")
    index = SafetensorsIndex(src)
    raw = index.read(["lm_head.weight"])["lm_head.weight"]
    table = Table("lm_head.weight", "", torch.float32, tuple(raw.shape), fold=normalize_rows)
    folded = torch.cat(list(row_chunks(index, table, rows=100)))
    torch.testing.assert_close(folded, torch.nn.functional.normalize(raw, dim=-1))
    assert raw.norm(dim=-1).std() > 1  # the fixture's rows differ in norm, so a missed fold changes tokens


def test_folded_norm_head():
    for fold in ("self.weight.data = nn.functional.normalize(self.weight)",
                 "self.weight = nn.Parameter(nn.functional.normalize(self.weight))"):
        assert_rule(FoldedNormHead, f"""
            class NormHead(nn.Module):
                def forward(self, hidden_states):
                    if self.training:
                        norm_weight = nn.functional.normalize(self.weight)
                    elif self.first_flag:
                        self.first_flag = False
                        {fold}
                        norm_weight = self.weight
                    else:
                        norm_weight = self.weight
                    return nn.functional.linear(hidden_states, norm_weight)
        """, """
            class NormHead(nn.Module):
                def forward(self, hidden_states):
                    # surgery: test/rule: rows normalized in torch; export writes them folded into the head's table
                    weight = self.weight if torch.jit.is_tracing() else nn.functional.normalize(self.weight)
                    return nn.functional.linear(hidden_states, weight)
        """)
    assert_rule(FoldedNormHead, """
        class Head(nn.Module):
            def forward(self, x):
                return F.linear(x, F.normalize(self.weight))
    """, None)
