"""Bundles are not trusted: a manifest naming files outside the bundle, graphs copied over each other or
damaged, broken manifests, and commands run on the wrong kind of directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from adversarial.guards import Guard

READERS = {
    "run": lambda d: ["run", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
    "verify": lambda d: ["verify", d, "--trust-remote-code"],
    "optimize": lambda d: ["optimize", d, "--target", "generic"],
    "compile": lambda d: ["compile", d, "--chip", "ax650", "-o", d.parent / "kit"],
}


def edit_manifest(bundle: Path, fn) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def graph(data: dict, name: str) -> dict:
    return next(g for g in data["graphs"] if g["name"] == name)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.mkdir()
    (path / "block_0.onnx").write_text("someone else's file")
    return path


@pytest.mark.parametrize("command", list(READERS))
def test_graph_path_escaping_the_bundle(cli, bundle: Path, victim: Path, command: str):
    edit_manifest(bundle, lambda d: graph(d, "block_0").update(file="../victim/block_0.onnx"))
    guard = Guard(victim, bundle.parent / "sentinel")
    cli(*READERS[command](bundle)).one_line_error("outside the bundle")
    guard.unchanged()
    assert sorted(p.name for p in victim.iterdir()) == ["block_0.onnx"]


@pytest.mark.parametrize("command", ["run", "verify", "optimize"])
def test_absolute_graph_path(cli, bundle: Path, command: str):
    edit_manifest(bundle, lambda d: graph(d, "lm_head").update(file="/etc/passwd"))
    cli(*READERS[command](bundle)).one_line_error("outside the bundle", "/etc/passwd")


@pytest.mark.parametrize("command", ["run", "optimize"])
def test_data_file_escaping_the_bundle(cli, bundle: Path, victim: Path, command: str):
    edit_manifest(bundle, lambda d: graph(d, "embedding").update(data_file="../victim/block_0.onnx"))
    guard = Guard(victim)
    cli(*READERS[command](bundle)).one_line_error("outside the bundle")
    guard.unchanged()


def test_symlink_leading_out(cli, bundle: Path, victim: Path):
    (bundle / "block_0.onnx").unlink()
    os.symlink(victim / "block_0.onnx", bundle / "block_0.onnx")
    cli(*READERS["run"](bundle)).one_line_error("leading outside the bundle")


@pytest.mark.parametrize("command", ["run", "verify", "optimize", "compile"])
def test_graph_copied_over_another(cli, bundle: Path, command: str):
    shutil.copyfile(bundle / "block_1.onnx", bundle / "block_0.onnx")
    cli(*READERS[command](bundle)).one_line_error("graph block_0", "does not match the manifest")


@pytest.mark.parametrize("damage", ["truncated", "deleted", "garbage"])
def test_damaged_graph(cli, bundle: Path, damage: str):
    path = bundle / "lm_head.onnx"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"\x00\xff" * 50)
    cli(*READERS["run"](bundle)).one_line_error("graph lm_head")


@pytest.mark.parametrize(("text", "needle"), [
    ("{broken", "is not a valid manifest"),
    ('{"graphs": 3}', "is not a valid manifest"),
    ('{"graphs": ["x"]}', "is not a valid manifest"),
    ("[]", "is not a valid manifest"),
])
def test_broken_manifest(cli, bundle: Path, text: str, needle: str):
    (bundle / "manifest.json").write_text(text)
    for command in ("run", "verify", "optimize"):
        cli(*READERS[command](bundle)).one_line_error(needle)


def test_no_manifest(cli, bundle: Path):
    (bundle / "manifest.json").unlink()
    cli(*READERS["run"](bundle)).one_line_error("has no manifest.json")


def test_tokenizer_file_escaping(cli, bundle: Path):
    edit_manifest(bundle, lambda d: d.update(tokenizer_files=["../../etc/passwd"]))
    cli("run", bundle, "--prompt", "hi").one_line_error("outside the bundle")


def test_verify_refuses_a_changed_source_model(cli, bundle: Path, bundle_src: Path, tmp_path: Path):
    source = tmp_path / "patched"
    shutil.copytree(bundle_src.parent / "patched", source, symlinks=True)
    edit_manifest(bundle, lambda d: d["source"].update(model_dir=str(source)))
    (source / "modeling_qwen.py").write_text((source / "modeling_qwen.py").read_text() + "\nimport os\n")
    cli("verify", bundle, "--trust-remote-code").one_line_error("changed since")


def test_verify_refuses_a_source_that_is_not_an_apply_output(cli, bundle: Path, tmp_path: Path):
    edit_manifest(bundle, lambda d: d["source"].update(model_dir=str(tmp_path)))
    cli("verify", bundle, "--trust-remote-code").one_line_error("not a `surgery apply` output")


@pytest.mark.parametrize(("args", "needle"), [
    (["--prompt-ids", "a,b"], "not a list of integers"),
    (["--prompt-ids", "999999"], "prompt ids must be in"),
    (["--prompt-ids", "1", "--prompt", "x"], "exactly one of"),
    ([], "exactly one of"),
    (["--prompt-ids", "1", "--backend", "mnn"], "holds onnxruntime models"),
])
def test_run_bad_options(cli, bundle: Path, args: list[str], needle: str):
    cli("run", bundle, *args).one_line_error(needle)


@pytest.mark.parametrize(("args", "needle"), [
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--target", "generic", "--skip", "nosuch"], "no pass named 'nosuch'"),
    (["--target", "generic", "--passes", "nosuch"], "no pass named 'nosuch'"),
])
def test_optimize_bad_options(cli, bundle: Path, args: list[str], needle: str):
    guard = Guard(bundle)
    cli("optimize", bundle, *args).one_line_error(needle)
    guard.unchanged()


def test_optimize_a_directory_with_foreign_files(cli, bundle: Path):
    (bundle / "notes.txt").write_text("mine")
    cli("optimize", bundle, "--target", "generic").one_line_error("holds files surgery did not write")


def test_optimize_a_directory_surgery_did_not_write(cli, bundle: Path):
    (bundle / ".surgery.json").unlink()
    cli("optimize", bundle, "--target", "generic").one_line_error("was not written by `surgery export`")


@pytest.mark.parametrize(("args", "needle"), [
    (["--chip", "nosuch"], "nosuch"),
    (["--chip", "mnn", "-q", "w3"], "-q 'w3' is not a quantization mnn takes"),
    (["--chip", "bm1684x", "-q", "bogus"], "bogus"),
])
def test_compile_bad_options(cli, bundle: Path, tmp_path: Path, args: list[str], needle: str):
    cli("compile", bundle, *args, "-o", tmp_path / "out").one_line_error(needle)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_compile_output_inside_the_export(cli, bundle: Path):
    guard = Guard(bundle)
    cli("compile", bundle, "--chip", "ax650", "-o", bundle / "kit").one_line_error("lies inside the export")
    guard.unchanged()
