"""The pack registry: entry-point packs beside the built-ins, the export spec declared on the pack, and the
warning when transformers is outside the range a pack was checked with."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import surgery.packs as packs
from surgery.apply import plan_apply
from surgery.errors import SurgeryError
from surgery.export.source import export_spec_for
from surgery.packs import ENTRY_POINT_GROUP, ApplyOptions, Pack, all_packs, get_pack
from surgery.patches.native_rules import NATIVE_SPEC
from surgery.patches.qwen import EXPORT_SPEC as QWEN_SPEC

TINY = '''
from surgery.patches.native_rules import native_pack

PACK = native_pack("tinyllama", family="llama", model_types=("tinyllama",), architecture="LlamaForCausalLM",
                   summary="a llama under another name")
QWEN = __import__("surgery.patches.qwen", fromlist=["PACK"]).PACK
'''


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """`all_packs` over the built-ins plus the given entry points (values as in entry_points.txt)."""
    (tmp_path / "tinypack.py").write_text(TINY)
    (tmp_path / "badpack.py").write_text("raise RuntimeError('no GPU\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def use(**values: str) -> dict[str, Pack]:
        found = [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in values.items()]
        monkeypatch.setattr(packs, "entry_points", lambda group: found if group == ENTRY_POINT_GROUP else [])
        all_packs.cache_clear()
        return all_packs()

    yield use
    all_packs.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_entry_point_packs_join_the_builtins(registry, caplog):
    found = registry(tiny="tinypack:PACK", module="tinypack")  # a Pack object, or a module with PACK
    assert found["tinyllama"].model_types == ("tinyllama",) and {"qwen", "llama"} <= set(found)
    assert packs.pack_for_model_type("tinyllama").name == "tinyllama"
    assert warnings_of(caplog) == ["warning: pack entry point tinypack skipped: a pack named 'tinyllama' is "
                                   "already known"]


def test_a_broken_entry_point_is_one_warning(registry, caplog):
    found = registry(gone="nopack:PACK", bad="badpack:PACK", clash="tinypack:QWEN", wrong="tinypack:native_pack")
    assert "tinyllama" not in found and found["qwen"] is get_pack("qwen")
    assert warnings_of(caplog) == [
        "warning: pack entry point 'gone' (nopack:PACK) skipped: ModuleNotFoundError: No module named 'nopack'",
        "warning: pack entry point 'bad' (badpack:PACK) skipped: RuntimeError: no GPU",
        "warning: pack entry point tinypack:QWEN skipped: a pack named 'qwen' is already known",
        "warning: pack entry point 'wrong' (tinypack:native_pack) skipped: TypeError: tinypack:native_pack is "
        "neither a Pack nor a module defining PACK",
    ]


def test_export_spec_is_declared_on_the_pack():
    assert get_pack("qwen").export_spec is QWEN_SPEC and export_spec_for("qwen") is QWEN_SPEC
    assert {p.name for p in all_packs().values() if p.export_spec is NATIVE_SPEC} == {
        "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3"}
    with pytest.raises(SurgeryError, match="export has no spec for model_type 'gpt2'"):
        export_spec_for("gpt2")


def test_a_pack_without_export_spec_is_one_clear_line(monkeypatch):
    bare = Pack("bare", "0.1.0", "no spec yet", ("bare",), ("BareForCausalLM",), {}, lambda o: {}, ">=5,<6")
    monkeypatch.setattr("surgery.export.source.pack_for_model_type", lambda t: bare)
    with pytest.raises(SurgeryError, match="pack 'bare' declares no export spec"):
        export_spec_for("bare")


def test_checked_with_must_be_a_specifier():
    with pytest.raises(ValueError, match="checked_with 'transformers 5' is not a version specifier"):
        Pack("x", "0", "x", ("x",), (), {}, lambda o: {}, "transformers 5")


@pytest.fixture
def transformers_version(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packs, "_warned", set())

    def use(version: str) -> None:
        monkeypatch.setattr(packs, "installed_transformers", lambda: version)

    return use


def test_apply_warns_once_outside_checked_with(qwen_src: Path, transformers_version, caplog):
    transformers_version("4.57.1")
    for _ in range(2):
        plan_apply(get_pack("qwen"), qwen_src, ApplyOptions())
    assert warnings_of(caplog) == ["warning: pack 'qwen' was checked with transformers >=5.0,<6, but 4.57.1 is "
                                   "installed; check the result (the conformance test) or install a checked version"]


@pytest.mark.parametrize("version", ["5.3.0", "5.1.0rc1", "5.99.0.dev0"])
def test_no_warning_inside_checked_with(qwen_src: Path, transformers_version, caplog, version: str):
    transformers_version(version)
    plan_apply(get_pack("qwen"), qwen_src, ApplyOptions())
    assert warnings_of(caplog) == []


def test_export_warns_outside_checked_with(transformers_version, caplog):
    transformers_version("6.0.0")
    export_spec_for("llama")
    export_spec_for("llama")
    assert warnings_of(caplog) == ["warning: pack 'llama' was checked with transformers >=5.20,<6, but 6.0.0 is "
                                   "installed; check the result (the conformance test) or install a checked version"]
