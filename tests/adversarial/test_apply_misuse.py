"""`surgery apply` misused: bad models, bad options, outputs that would touch the model or a user's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from adversarial.guards import Guard


def test_missing_model(cli, world: Path):
    guard = Guard(world / "m", world / "sentinel")
    cli("apply", "qwen", "--model", world / "nope").one_line_error("does not exist")
    guard.unchanged()


def test_model_is_a_file(cli, world: Path):
    cli("apply", "qwen", "--model", world / "m" / "config.json").one_line_error("is not a directory")


@pytest.mark.parametrize(("config", "needle"), [
    (None, "has no config.json"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds no JSON object"),
])
def test_broken_config(cli, world: Path, config: str | None, needle: str):
    path = world / "m" / "config.json"
    path.unlink()
    if config is not None:
        path.write_text(config)
    guard = Guard(world / "m", world / "sentinel")
    cli("apply", "qwen", "--model", world / "m").one_line_error(needle)
    guard.unchanged()


def test_auto_without_model_type(cli, world: Path):
    config = json.loads((world / "m" / "config.json").read_text())
    del config["model_type"]
    (world / "m" / "config.json").write_text(json.dumps(config))
    result = cli("apply", "auto", "--model", world / "m")
    result.one_line_error("no model_type")
    assert "port None" not in result.err


def test_unknown_pack(cli, world: Path):
    cli("apply", "nosuchpack", "--model", world / "m").one_line_error("nosuchpack")


@pytest.mark.parametrize("where", ["model", "parent", "inside"])
def test_output_touching_the_model_is_refused_even_forced(cli, world: Path, where: str):
    out = {"model": world / "m", "parent": world, "inside": world / "m" / "sub"}[where]
    guard = Guard(world / "m", world / "sentinel")
    result = cli("apply", "qwen", "--model", world / "m", "--out", out, "--force")
    result.one_line_error({"model": "is the model", "parent": "contains the model",
                           "inside": "lies inside the model"}[where])
    guard.unchanged()
    assert (world / "m" / "model.safetensors").is_file()


def test_nested_model_parent_output_keeps_the_weights(cli, world: Path):
    """The reported data loss: --model ./par/m --out ./par --force deleted the model."""
    (world / "par").mkdir()
    (world / "m").rename(world / "par" / "m")
    guard = Guard(world / "par")
    cli("apply", "qwen", "--model", world / "par" / "m", "--out", world / "par", "--force").one_line_error(
        "contains the model")
    guard.unchanged()


def test_foreign_output_is_never_replaced(cli, world: Path):
    mine = world / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    guard = Guard(world / "m", mine)
    for force in ([], ["--force"]):
        cli("apply", "qwen", "--model", world / "m", "--out", mine, *force).one_line_error(
            "not written by surgery")
    guard.unchanged()


def test_user_file_added_to_our_output_blocks_a_replace(cli, world: Path):
    assert cli("apply", "qwen", "--model", world / "m", "--out", world / "o").code == 0
    (world / "o" / "notes.md").write_text("mine")
    cli("apply", "qwen", "--model", world / "m", "--out", world / "o", "--force").one_line_error(
        "holds files surgery did not write", "notes.md")
    assert (world / "o" / "notes.md").read_text() == "mine"


def test_output_that_is_a_file(cli, world: Path):
    (world / "file").write_text("x")
    cli("apply", "qwen", "--model", world / "m", "--out", world / "file").one_line_error("is not a directory")
    assert (world / "file").read_text() == "x"


@pytest.mark.parametrize(("args", "needle"), [
    (["--only", "sdpa-off", "--skip", "sdpa-off"], "both --only and --skip"),
    (["--only", "nosuch"], "has no patch nosuch"),
    (["--skip", "nosuch"], "has no patch nosuch"),
    (["--seq-length", "200000"], "out of range"),
    (["--seq-length", "9000"], "out of range"),
])
def test_bad_options(cli, world: Path, args: list[str], needle: str):
    guard = Guard(world / "m", world / "sentinel")
    cli("apply", "qwen", "--model", world / "m", *args).one_line_error(needle)
    guard.unchanged()
    assert not (world / "m-surgery").exists()


def test_latin1_modeling_file(cli, world: Path):
    path = world / "m" / "modeling_qwen.py"
    path.write_bytes(path.read_bytes().replace(b"# coding", b"# caf\xe9 coding", 1) + b"\n# na\xefve\n")
    cli("apply", "qwen", "--model", world / "m").one_line_error("modeling_qwen.py is not UTF-8")


def test_modeling_file_that_does_not_parse(cli, world: Path):
    (world / "m" / "modeling_qwen.py").write_text("def broken(:\n")
    cli("apply", "qwen", "--model", world / "m").one_line_error("cannot parse Python")


def test_name_too_long(cli, world: Path):
    cli("apply", "qwen", "--model", world / "m", "--out", world / ("x" * 300)).one_line_error("too long")


def test_long_name_within_the_limit_works(cli, world: Path):
    out = world / ("y" * 240)
    assert cli("apply", "qwen", "--model", world / "m", "--out", out).code == 0
    assert (out / "surgery.json").is_file()


def test_symlink_loop_as_model(cli, world: Path):
    os.symlink(world / "loop", world / "loop")
    cli("apply", "qwen", "--model", world / "loop").one_line_error()


def test_dot_model_names_the_directory(cli, world: Path):
    result = cli("apply", "qwen", "--model", ".", "--json", cwd=world / "m")
    assert result.code == 0, result.err
    assert (world / "m-surgery" / "surgery.json").is_file() and not (world / "m" / "-surgery").exists()
