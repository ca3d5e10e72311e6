"""`apply` as a file operation: outcomes, idempotence, strictness, dry-run, links, atomicity, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from surgery import apply as apply_mod
from surgery.apply import plan_apply, write_plan
from surgery.codemod import Outcome
from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file
from surgery.packs import ApplyOptions, get_pack

QWEN = get_pack("qwen")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def outcomes(plan) -> dict[str, tuple[str, str | None]]:
    return {r.patch: (str(r.outcome), r.rule) for r in plan.results}


def test_rule_matched_per_revision(qwen_src: Path, revision: str):
    got = outcomes(plan_apply(QWEN, qwen_src, ApplyOptions()))
    # what each revision style lacks, so its patch is "not applicable" rather than an abort
    absent = {"2023-08": {"sdpa-off", "sdpa-branch"}, "2023-09": {"sdpa-off", "sdpa-branch", "rotary-input"},
              "2023-11": {"attention-mask", "rotary-input"},
              "2023-12": {"full-divisor", "attention-mask", "rotary-input"}}[revision]
    if revision == "2023-12":
        assert got["causal-mask"] == ("applied", "tril causal mask (2023-12)")
    else:
        assert got["causal-mask"] == ("applied", "registered_causal_mask (2023-09, 2023-11)")
    if revision in ("2023-08", "2023-09"):
        assert got["attention-mask"] == ("applied", "add attention_mask before softmax (2023-09)")
    if revision == "2023-08":
        assert got["rotary-input"] == ("applied", "rotary-from-caller")
    assert {p: o for p, (o, _) in got.items()} == {p: "not applicable" if p in absent else "applied" for p in got}
    assert len(got) == 10


def test_not_applicable_says_why(qwen_src: Path, revision: str):
    """2023-09 predates SDPA: `sdpa-off` is reported with its reason instead of aborting on SUPPORT_TORCH2."""
    plan = plan_apply(QWEN, qwen_src, ApplyOptions())
    reasons = {r.patch: r.detail for r in plan.results if r.outcome is Outcome.NOT_APPLICABLE}
    if revision in ("2023-08", "2023-09"):
        assert reasons["sdpa-off"] == "this revision predates SDPA support (no SUPPORT_TORCH2 flag)"
    else:
        assert reasons["attention-mask"] == "`_attn` already adds attention_mask in this revision"


def test_output_directory_contents(qwen_src: Path, qwen_patched: Path):
    record = json.loads((qwen_patched / "surgery.json").read_text())
    weights = qwen_patched / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (qwen_src / "model.safetensors").resolve()
    assert record["linked"] == ["model.safetensors"]
    assert not (qwen_patched / "configuration_qwen.py").is_symlink()
    config = json.loads((qwen_patched / "config.json").read_text())
    assert (config["seq_length"], config["max_position_embeddings"]) == (64, 64)
    assert (config["fp32"], config["bf16"], config["fp16"], config["use_flash_attn"]) == (True, False, False, False)
    hashes = record["hashes"]
    assert hashes["modeling_qwen.py"]["before"] == sha256_file(qwen_src / "modeling_qwen.py")
    assert hashes["modeling_qwen.py"]["after"] == sha256_file(qwen_patched / "modeling_qwen.py")
    assert hashes["configuration_qwen.py"]["before"] == hashes["configuration_qwen.py"]["after"]
    assert hashes["config.json"]["after"] == sha256_file(qwen_patched / "config.json")
    assert record["pack"]["name"] == "qwen" and record["options"]["seq_length"] == 64
    assert {"libcst", "transformers", "python"} <= set(record["versions"])
    assert len(record["patches"]) == 10
    assert not list(qwen_patched.parent.glob(".surgery-staging-*"))


def test_idempotent_on_own_output(qwen_src: Path, qwen_patched: Path):
    before = {p.name: p.read_bytes() for p in qwen_patched.iterdir() if p.is_file()}
    first = plan_apply(QWEN, qwen_src, ApplyOptions(seq_length=64, dtype="fp32"))
    plan = plan_apply(QWEN, qwen_patched, ApplyOptions(seq_length=64, dtype="fp32"))
    again = {Outcome.APPLIED: Outcome.ALREADY_APPLIED, Outcome.NOT_APPLICABLE: Outcome.NOT_APPLICABLE}
    assert [r.outcome for r in plan.results] == [again[r.outcome] for r in first.results]
    assert not plan.changed and plan.diff() == ""
    assert before == {p.name: p.read_bytes() for p in qwen_patched.iterdir() if p.is_file()}


def test_anchor_missing_aborts_and_writes_nothing(qwen_src: Path, tmp_path: Path):
    model = copy_model(qwen_src, tmp_path / "m")
    source = (model / "modeling_qwen.py").read_text()
    (model / "modeling_qwen.py").write_text(source.replace("if layer_past is not None:", "if layer_past:"))
    with pytest.raises(SurgeryError) as err:
        plan_apply(QWEN, model, ApplyOptions())
    message = str(err.value)
    assert "pack qwen, patch present-kv, file modeling_qwen.py: anchor not found" in message
    assert "`if use_cache: present = ...` after `if layer_past is not None:`" in message
    assert "Nothing was written" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_dry_run_diff_and_no_writes(qwen_src: Path, tmp_path: Path):
    plan = plan_apply(QWEN, qwen_src, ApplyOptions(seq_length=32))
    diff = plan.diff()
    assert "+        # surgery: qwen/present-kv" in diff and '+  "seq_length": 32,' in diff
    assert not (qwen_src.parent / "model-surgery").exists()


def test_apply_never_runs_model_code(qwen_src: Path, tmp_path: Path):
    model = copy_model(qwen_src, tmp_path / "m")
    path = model / "modeling_qwen.py"
    path.write_text("raise SystemExit('model code was executed')\n" + path.read_text())
    plan = plan_apply(QWEN, model, ApplyOptions())
    write_plan(plan, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_qwen.py").read_text().startswith("raise SystemExit")


def test_interrupted_write_leaves_no_output(qwen_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    plan = plan_apply(QWEN, qwen_src, ApplyOptions())

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply_mod, "atomic_write_json", boom)  # dies after every other file is staged
    with pytest.raises(KeyboardInterrupt):
        write_plan(plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_plan(plan, tmp_path / "out")
    assert (tmp_path / "out" / "surgery.json").is_file()


def test_rewrite_replaces_previous_output(qwen_src: Path, tmp_path: Path):
    write_plan(plan_apply(QWEN, qwen_src, ApplyOptions(seq_length=32)), tmp_path / "out")
    write_plan(plan_apply(QWEN, qwen_src, ApplyOptions(seq_length=48)), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["seq_length"] == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "bad-json", "other-type", "unparseable",
                                  "no-modeling", "unknown-patch"])
def test_bad_input_is_one_clear_line(qwen_src: Path, tmp_path: Path, case: str):
    model = copy_model(qwen_src, tmp_path / "m")
    options = ApplyOptions()
    expect = {
        "missing": "does not exist", "file": "is not a directory", "no-config": "has no config.json",
        "bad-json": "is not valid JSON", "other-type": "is a 'llama' model, but pack 'qwen' handles qwen",
        "unparseable": "modeling_qwen.py line 3: cannot parse Python", "no-modeling": "has no modeling_qwen.py",
        "unknown-patch": "has no patch nope",
    }[case]
    if case == "missing":
        model = tmp_path / "absent"
    elif case == "file":
        model = model / "config.json"
    elif case == "no-config":
        (model / "config.json").unlink()
    elif case == "bad-json":
        (model / "config.json").write_text("{not json")
    elif case == "other-type":
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    elif case == "unparseable":
        (model / "modeling_qwen.py").write_text("import torch\n\ndef broken(:\n")
    elif case == "no-modeling":
        (model / "modeling_qwen.py").unlink()
    elif case == "unknown-patch":
        options = ApplyOptions(skip=("nope",))
    with pytest.raises(SurgeryError) as err:
        plan_apply(QWEN, model, options)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_never_replaces_what_surgery_did_not_write(qwen_src: Path, tmp_path: Path):
    plan = plan_apply(QWEN, qwen_src, ApplyOptions())
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(SurgeryError, match="was not written by surgery"):
            write_plan(plan, foreign, force=force)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(SurgeryError, match="is the model"):
        write_plan(plan, qwen_src, force=True)
    with pytest.raises(SurgeryError, match="contains the model"):
        write_plan(plan, qwen_src.parent, force=True)
    ours = tmp_path / "ours"
    write_plan(plan, ours)
    write_plan(plan, ours)  # a rerun replaces our own output
    (ours / "notes.txt").write_text("a user's file in our output")
    with pytest.raises(SurgeryError, match=r"holds files surgery did not write \(notes.txt\)"):
        write_plan(plan, ours, force=True)
    assert (ours / "notes.txt").is_file() and (ours / "surgery.json").is_file()
