"""`surgery convert`, `fixture` and `port` misused: every option checked before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from adversarial.guards import Guard


def convert(cli, world: Path, *args: str, out: str = "bundle"):
    return cli("convert", "qwen", "-m", world / "m", "-o", world / out, "-s", "16", "--trust-remote-code", *args)


@pytest.mark.parametrize(("args", "needle"), [
    (["-q", "bogus"], "-q 'bogus' is not a quantization"),
    (["-q", "w8", "-c", "mnn"], "-q 'w8' is not a quantization"),
    (["-c", "nosuch"], "unknown chip 'nosuch'"),
    (["-g", "48"], "-g 48 must be a power of two"),
    (["-g", "0"], "-g 0 must be a power of two"),
    (["-s", "200000"], "out of range"),
    (["--max_input_length", "16"], "--max_input_length 16"),
])
def test_bad_options_fail_before_any_work(cli, world: Path, args: list[str], needle: str):
    guard = Guard(world / "m", world / "sentinel")
    convert(cli, world, *args).one_line_error(needle)
    guard.unchanged()
    assert not (world / "bundle" / "stages").exists()


def test_remote_code_needs_consent(cli, world: Path):
    cli("convert", "qwen", "-m", world / "m", "-o", world / "b", "-s", "16").one_line_error("--trust-remote-code")


@pytest.mark.parametrize("where", ["m", "m/out"])
def test_output_touching_the_model(cli, world: Path, where: str):
    guard = Guard(world / "m")
    convert(cli, world, "-c", "ax650", out=where).one_line_error("the model")
    guard.unchanged()


def test_output_holding_a_users_files(cli, world: Path):
    mine = world / "mine"
    mine.mkdir()
    (mine / "plan.txt").write_text("mine")
    guard = Guard(mine)
    convert(cli, world, "-c", "ax650", "--force", out="mine").one_line_error("not written by surgery")
    guard.unchanged()


def test_missing_toolchain_is_reported_before_any_stage(cli, world: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SURGERY_HOME", str(world / "no-toolchains"))
    convert(cli, world, "-c", "bm1684x").one_line_error("toolchain is not installed")
    assert not (world / "bundle" / "stages").exists()


def test_fixture_never_overwrites_a_users_model(cli, world: Path):
    guard = Guard(world / "m")
    cli("fixture", "qwen", "--out", world / "m").one_line_error("not written by surgery")
    guard.unchanged()


def test_fixture_rerun_replaces_its_own_output(cli, world: Path):
    assert cli("fixture", "llama", "--out", world / "f").code == 0
    assert cli("fixture", "llama", "--out", world / "f").code == 0
    assert json.loads((world / "f" / ".surgery.json").read_text())["command"] == "fixture"


@pytest.mark.parametrize(("args", "needle"), [
    (["nosuch", "--out", "x"], "no fixture named 'nosuch'"),
])
def test_fixture_bad_kind(cli, world: Path, args: list[str], needle: str):
    cli("fixture", *args).one_line_error(needle)


def test_fixture_over_a_file(cli, world: Path):
    (world / "file").write_text("x")
    cli("fixture", "qwen", "--out", world / "file").one_line_error("is not a directory")


@pytest.mark.parametrize(("args", "needle"), [
    (["Bad-Name", "--like", "llama"], "not a model_type-style name"),
    (["olmo9", "--like", "nosuch"], "nosuch"),
])
def test_port_bad_arguments(cli, world: Path, args: list[str], needle: str):
    cli("port", *args, "--dest", world / "proj").one_line_error(needle)


def test_port_force_never_replaces_a_users_file(cli, world: Path):
    pack = world / "proj" / "patches" / "olmo2.py"
    pack.parent.mkdir(parents=True)
    pack.write_text("# my own pack\n")
    cli("port", "olmo2", "--like", "llama", "--dest", world / "proj").one_line_error("pass --force")
    cli("port", "olmo2", "--like", "llama", "--dest", world / "proj", "--force").one_line_error(
        "was not written by `surgery port`")
    assert pack.read_text() == "# my own pack\n"


def test_port_force_replaces_its_own_scaffold(cli, world: Path):
    assert cli("port", "olmo2", "--like", "llama", "--dest", world / "proj").code == 0
    assert cli("port", "olmo2", "--like", "llama", "--dest", world / "proj", "--force").code == 0
