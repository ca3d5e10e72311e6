"""`surgery convert`: one command to a bundle with a report, resuming where it stopped."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from surgery.compile.toolchains import installed
from surgery.convert import ConvertOptions, convert
from surgery.errors import SurgeryError
from surgery.fixtures.native import build_native
from surgery.runtime import open_runtime


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_native("qwen2", tmp_path_factory.mktemp("convert") / "qwen2")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and v and "://" in v]


def test_axera_bundle_report_and_resume(model: Path, tmp_path: Path):
    out = tmp_path / "bundle"
    options = ConvertOptions("auto", model, out, seq_length=32, chip="ax650")
    stages: list[str] = []
    first = convert(options, progress=stages.append)
    assert stages == ["apply", "export", "optimize", "compile"]
    runtime = json.loads((out / "runtime_config.json").read_text())
    assert runtime["chip"] == "ax650" and runtime["seq_length"] == 32 and runtime["chat_template"]
    assert runtime["contract"] == "blocks" and runtime["mask_value"] == -10000.0
    assert (out / "build.sh").is_file() and (out / "qwen2.embed_tokens.bf16.bin").is_file()  # the Pulsar2 kit
    assert sorted(p.name for p in (out / "configs").iterdir()) and (out / "onnx" / "qwen2_post.onnx").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "manifest.json").is_file()
    report = (out / "report.md").read_text()
    assert "On the board: AXERA-TECH/ax-llm" in report  # which vendor runtime loads the bundle
    assert "| block_cache_1 | 1.0000000 |" in report and "```diff" in report and "cache-to-present" in report
    page = _Tags()
    page.feed((out / "report.html").read_text())
    assert "svg" in page.tags and "table" in page.tags and page.external == []  # one self-contained file
    # a rerun does nothing; a new chip reruns only the stages after the change
    again: list[str] = []
    assert convert(options, progress=again.append)["timings"] == first["timings"] and again == []
    changed: list[str] = []
    convert(ConvertOptions("auto", model, out, seq_length=32, chip="ax630c"), progress=changed.append)
    assert changed == ["optimize", "compile"]


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_mnn_bundle_runs(model: Path, tmp_path: Path):
    out = tmp_path / "mnn"
    convert(ConvertOptions("qwen2", model, out, seq_length=32, quantize="w8bf16", q_group_size=32, chip="mnn"))
    runtime = json.loads((out / "runtime_config.json").read_text())
    assert runtime["backend"] == "mnn" and all((out / f).is_file() for f in runtime["model_files"])
    # one graph the engine runs whole, KV inside it: the manifest says which contract, and the runtime follows it
    assert runtime["contract"] == "engine" and "kv_cache" in runtime["conventions"]
    assert "On the board: MNN's LLM engine" in (out / "report.md").read_text()
    # the engine graph is traced from the patched model: no optimize passes run for it
    stages = json.loads((out / "convert.json").read_text())["stages"]
    assert stages["optimize"]["result"]["graphs"] == {} and "patched model" in stages["optimize"]["result"]["skipped"]
    # ...nor any per-block ONNX graph exported: the engine's check runs the patched model itself
    export = out / "stages" / "export"
    assert (export / "manifest.json").is_file() and not list(export.glob("*.onnx"))
    assert stages["export"]["result"]["parity"] == []
    assert json.loads((out / "manifest.json").read_text())["compiled"]["parity"][0]["cosine"] >= 0.999
    assert len(open_runtime(out).generate([3, 5, 7, 11], 6).tokens) == 6


@pytest.mark.parametrize("change,message", [
    ({"chip": "tpu9000"}, "unknown chip 'tpu9000'"),
    ({"max_input_length": 64}, "--max_input_length 64 must be between 1 and seq_length - 1"),
    ({"pack": "llama"}, "is a 'qwen2' model, but pack 'llama' handles llama"),
])
def test_bad_convert_input(model: Path, tmp_path: Path, change: dict, message: str):
    options = {"pack": "auto", "model_path": model, "out_dir": tmp_path / "out", "seq_length": 32, **change}
    with pytest.raises(SurgeryError, match=message):
        convert(ConvertOptions(**options))
    assert not (tmp_path / "out" / "stages").exists() or change.get("pack")


def test_remote_code_needs_consent(tmp_path: Path):
    from surgery.fixtures.qwen_v1 import build

    src = build(tmp_path / "qwen")
    with pytest.raises(SurgeryError, match="pass --trust-remote-code"):
        convert(ConvertOptions("qwen", src, tmp_path / "out", seq_length=32, chip="ax650"))
    assert not (tmp_path / "out").exists()


def test_compiler_workers_start_early_only_below_7b_tables():
    """Prewarmed workers overlap export at small sizes; at a 7B table they would add 2 GB to export's peak."""
    from surgery.convert import PREWARM_BELOW, table_bytes

    assert table_bytes({"vocab_size": 151936, "hidden_size": 896}) < PREWARM_BELOW  # Qwen2-0.5B: prewarm
    assert table_bytes({"vocab_size": 151936, "hidden_size": 4096}) >= PREWARM_BELOW  # Qwen-7B: not
    assert table_bytes({"padded_vocab_size": 65024, "hidden_size": 4096}) == 65024 * 4096 * 2  # ChatGLM's key
    assert table_bytes({}) == 0


@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run `surgery toolchain install "
                    "sophgo` (make toolchains)")
def test_table_graphs_are_built_during_export(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With checks off, the vocabulary-table graphs start building as export finishes them (lm_head judged as
    optimize will leave it); the compile stage finds exactly those builds: one cache entry per graph, none
    built twice. With checks on they are built by the compile stage (compile/sophgo_ahead.py says why)."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bm"
    convert(ConvertOptions("qwen2", model, out, seq_length=32, quantize="w8bf16", q_group_size=32, chip="bm1684x",
                           check="none"))
    details = json.loads((out / "manifest.json").read_text())["compiled"]["details"]
    graphs = list(details["routes"])
    assert len(list((tmp_path / "cache" / "sophgo").glob("*.bmodel"))) == len(graphs)
    tables = {"embedding", "embedding_cache", "lm_head"}
    assert {g for g, r in details["routes"].items() if r["route"] == "table"} == tables
    assert tables <= set(details["build_seconds"])  # built by this run,
    assert not any((out / "stages" / "compile" / "work" / g / "seconds.json").exists() for g in tables)  # ahead
    assert not (out / "stages" / "ahead").exists()  # whose scratch is gone
