"""The chatglm pack on its fixture, beyond the conformance suite: `apply auto` picks it, configs it cannot
make static are refused in one line before anything is written, a second apply changes nothing, and the
patched model's own forward (its `get_masks` now additive) still computes what the original does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.apply import plan_apply, read_config, write_plan
from surgery.codemod import Outcome
from surgery.errors import SurgeryError
from surgery.fixtures import chatglm
from surgery.packs import ApplyOptions, get_pack, resolve_pack


def test_auto_picks_chatglm_from_model_type(tmp_path: Path):
    src = chatglm.build(tmp_path / "src")
    config = read_config(src)[0]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert resolve_pack("auto", config).name == "chatglm"


def test_p_tuning_is_refused_in_one_line(tmp_path: Path):
    src = chatglm.build(tmp_path / "src", pre_seq_len=4)
    with pytest.raises(SurgeryError) as err:
        plan_apply(get_pack("chatglm"), src, ApplyOptions())
    message = str(err.value)
    assert "\n" not in message and "pre_seq_len=4" in message and "P-tuning" in message
    assert "export the base model" in message


def test_chatglm_v1_config_is_refused(tmp_path: Path):
    src = chatglm.build(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["multi_query_group_num"]
    (src / "config.json").write_text(json.dumps(config | {"position_encoding_2d": True}))
    with pytest.raises(SurgeryError, match="ChatGLM-6B v1"):
        plan_apply(get_pack("chatglm"), src, ApplyOptions())


@pytest.mark.parametrize("revision", chatglm.REVISIONS)
def test_every_patch_applies_then_reports_already_applied(revision: str, tmp_path: Path):
    src = chatglm.build(tmp_path / "src", revision=revision)
    pack = get_pack("chatglm")
    first = plan_apply(pack, src, ApplyOptions(seq_length=64))
    assert {r.outcome for r in first.results} == {Outcome.APPLIED}
    write_plan(first, tmp_path / "out")
    again = plan_apply(pack, tmp_path / "out", ApplyOptions(seq_length=64))
    assert {r.outcome for r in again.results} == {Outcome.ALREADY_APPLIED} and not again.changed


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@torch.no_grad()
def test_patched_forward_and_cache_match_original(tmp_path: Path):
    """Without a mask argument the patched model masks through get_masks (additive now), and a cached step
    returns only that step's K/V, sequence-first: [1, 1, groups, kv_channels]."""
    src = chatglm.build(tmp_path / "src")
    pack = get_pack("chatglm")
    write_plan(plan_apply(pack, src, ApplyOptions(only=pack.load_only)), tmp_path / "original")
    write_plan(plan_apply(pack, src, ApplyOptions()), tmp_path / "patched")
    original, patched = load(tmp_path / "original"), load(tmp_path / "patched")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    want = original(ids, use_cache=False).logits
    torch.testing.assert_close(patched(ids, use_cache=False).logits, want, rtol=0, atol=1e-5)
    prefix = patched(ids[:, :11], use_cache=True)
    assert prefix.past_key_values[0][0].shape == (11, 1, 2, 16)
    history = tuple((k, v) for k, v in prefix.past_key_values)
    step = patched(ids[:, 11:], past_key_values=history, position_ids=torch.tensor([[11]]), use_cache=True)
    assert step.past_key_values[0][0].shape == (1, 1, 2, 16)
    torch.testing.assert_close(step.logits[:, -1], want[:, -1], rtol=0, atol=1e-5)
