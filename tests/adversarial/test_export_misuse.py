"""`surgery export` misused: wrong inputs, outputs over the model or a user's files, options that make no
sense for this model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from adversarial.guards import Guard

SEQ = 16  # the length the shared bundle was applied and exported with



@pytest.fixture
def patched(tmp_path: Path, bundle_src: Path) -> Path:
    out = tmp_path / "patched"
    shutil.copytree(bundle_src.parent / "patched", out, symlinks=True)
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_text("a bystander's file")
    return out


def export(cli, model: Path, out: Path, *extra: str):
    return cli("export", model, "--out", out, "--seq-length", str(SEQ), "--trust-remote-code", *extra)


def test_not_an_apply_output(cli, world: Path):
    export(cli, world / "m", world / "o").one_line_error("was not produced by `surgery apply`")


def test_output_is_the_model(cli, patched: Path):
    guard = Guard(patched)
    export(cli, patched, patched).one_line_error("is the model")
    guard.unchanged()


def test_output_inside_the_model(cli, patched: Path):
    guard = Guard(patched)
    export(cli, patched, patched / "graphs").one_line_error("lies inside the model")
    guard.unchanged()


def test_users_tokenizer_is_not_overwritten(cli, patched: Path, tmp_path: Path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text('{"mine": true}')
    guard = Guard(mine, patched, tmp_path / "sentinel")
    export(cli, patched, mine).one_line_error("not written by surgery")
    guard.unchanged()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--blocks", "3-1"], "runs backwards"),
    (["--blocks", "0-"], "not a layer list"),
    (["--blocks", "x"], "not a layer list"),
    (["--blocks", "9"], "out of range"),
    (["--opset", "5"], "--opset 5 is not supported"),
    (["--opset", "99"], "--opset 99 is not supported"),
])
def test_bad_options(cli, patched: Path, tmp_path: Path, extra: list[str], needle: str):
    guard = Guard(patched, tmp_path / "sentinel")
    export(cli, patched, tmp_path / "o", *extra).one_line_error(needle)
    guard.unchanged()


def test_seq_length_beyond_the_model(cli, patched: Path, tmp_path: Path):
    result = cli("export", patched, "--out", tmp_path / "o", "--seq-length", "200000", "--trust-remote-code")
    result.one_line_error("out of range")


def test_remote_code_needs_consent(cli, patched: Path, tmp_path: Path):
    cli("export", patched, "--out", tmp_path / "o", "--seq-length", str(SEQ)).one_line_error("--trust-remote-code")


def test_dangling_weights(cli, patched: Path, tmp_path: Path):
    link = patched / "model.safetensors"
    link.unlink()
    link.symlink_to(tmp_path / "gone.safetensors")
    export(cli, patched, tmp_path / "o").one_line_error("missing")


def test_corrupt_weights(cli, patched: Path, tmp_path: Path):
    link = patched / "model.safetensors"
    link.unlink()
    link.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    export(cli, patched, tmp_path / "o").one_line_error("not a readable safetensors file")


def test_output_that_is_a_file(cli, patched: Path, tmp_path: Path):
    (tmp_path / "f").write_text("x")
    export(cli, patched, tmp_path / "f").one_line_error("is not a directory")
    assert (tmp_path / "f").read_text() == "x"
