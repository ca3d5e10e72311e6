"""The adapter registry: every chip known once, the docs table generated from it, and the worked-example
`onnx` adapter end to end (compile, check, run, convert)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import export_native

from surgery.compile.base import Adapter, CompileOptions
from surgery.compile.registry import adapter_for, adapters, all_chips, chips_table, runtime_for
from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.passes.pipelines import TARGETS
from surgery.runtime import OnnxModel, open_runtime

ROOT = Path(__file__).resolve().parents[1]


def test_every_chip_belongs_to_one_adapter_with_a_pipeline():
    chips = all_chips()
    assert len(chips) == len(set(chips))
    for adapter in adapters():
        assert isinstance(adapter, Adapter) and adapter.backend and adapter.loaded_by
        for chip in adapter.chips:
            assert adapter_for(chip) is adapter and adapter.target(chip) in TARGETS
    with pytest.raises(SurgeryError, match="unknown chip 'tpu9'; choose one of bm1684x"):
        adapter_for("tpu9")


def test_docs_table_is_the_generated_one():
    text = (ROOT / "docs" / "adapters.md").read_text()
    block = text.split("<!-- generated: surgery chips --markdown -->\n")[1].split("<!-- end generated -->")[0]
    assert block == chips_table()


def test_runtimes_are_found_by_backend():
    assert runtime_for("onnxruntime") is OnnxModel
    assert runtime_for("axmodel") is None


@pytest.mark.parametrize(("options", "needle"), [
    (CompileOptions("onnx", quantize="int3"), "-q 'int3' is not a quantization onnx takes"),
    (CompileOptions("onnx", group_size=48), "-g 48 must be a power of two"),
    (CompileOptions("onnx", check="most"), "--check 'most'"),
    (CompileOptions("bm1684x"), "compiles for onnx"),
])
def test_options_are_validated_by_the_adapter(options: CompileOptions, needle: str):
    with pytest.raises(SurgeryError, match=needle):
        adapter_for("onnx").validate(options)


def test_onnx_adapter_compiles_checks_and_runs(tmp_path: Path):
    onnx_dir = export_native("qwen2", tmp_path / "m", 16)
    adapter = adapter_for("onnx")
    manifest = adapter.compile(onnx_dir, tmp_path / "graphs", CompileOptions("onnx", check="all"))
    assert manifest.compiled.adapter == "onnx" and manifest.compiled.files
    assert {r["graph"] for r in manifest.compiled.parity} == {g.name for g in manifest.graphs}
    assert min(r["cosine"] for r in manifest.compiled.parity) >= 0.99999
    read = Manifest.read(tmp_path / "graphs")  # files checked against their hashes on the way in
    assert read.compiled.check == "all"
    prompt = [3, 9, 27, 81]
    assert open_runtime(tmp_path / "graphs").generate(prompt, 8).tokens == OnnxModel(onnx_dir).generate(
        prompt, 8).tokens
    with pytest.raises(SurgeryError, match="builds on this machine only"):
        adapter.compile(onnx_dir, tmp_path / "g2", CompileOptions("onnx"), executor=object())


def test_convert_to_onnx_bundle(tmp_path: Path):
    from surgery.convert import ConvertOptions, convert
    from surgery.fixtures.native import build_native

    src = build_native("llama", tmp_path / "src")
    result = convert(ConvertOptions("auto", src, tmp_path / "bundle", seq_length=16, quantize="bf16", chip="onnx"))
    runtime_config = json.loads((tmp_path / "bundle" / "runtime_config.json").read_text())
    assert runtime_config["adapter"] == "onnx" and set(result["timings"]) == {"apply", "export", "optimize",
                                                                                "compile"}
    assert len(OnnxModel(tmp_path / "bundle").generate([1, 2, 3], 4).tokens) == 4


def test_an_export_without_graphs_is_refused_by_graph_compilers(tmp_path: Path):
    """`convert -c mnn` exports only the manifest and host files (its engine is built from the patched model);
    a compiler that needs the graphs says so in one line instead of compiling nothing."""
    from surgery.export.exporter import ExportOptions, export_model

    export_native("qwen2", tmp_path)
    manifest = export_model(tmp_path / "patched", tmp_path / "bare",
                            ExportOptions(seq_length=32, trust_remote_code=True, graphs=False))
    assert manifest.graphs == [] and not list((tmp_path / "bare").glob("*.onnx"))
    assert manifest.tokenizer_files and all((tmp_path / "bare" / f).is_file() for f in manifest.tokenizer_files)
    with pytest.raises(SurgeryError, match="holds no graphs"):
        adapter_for("onnx").compile(tmp_path / "bare", tmp_path / "out", CompileOptions("onnx", "fp32", 64))
