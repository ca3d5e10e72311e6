"""`surgery convert` on GPTQ/AWQ checkpoints and with a LoRA adapter: -q and -g come from the checkpoint,
a contradicting -q is refused in one line, and the report says what the source was and what the
compiler's second quantization costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from quant_reference import dequantized_state

from surgery.compile.base import CompileOptions
from surgery.compile.toolchains import installed
from surgery.convert import ConvertOptions, convert
from surgery.errors import SurgeryError
from surgery.export.quant_config import SourceQuant
from surgery.fixtures.lora import build_lora
from surgery.fixtures.native import build_native
from surgery.fixtures.quantized import QuantSpec, build_quantized
from surgery.requantize import measure, requantize
from surgery.runtime import open_runtime
from surgery.source_quant import resolve

INT4_G32 = SourceQuant("gptq", 4, 32, True, False, "gptq", "config.json quantization_config")


@pytest.fixture(scope="module")
def gptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quantized(tmp_path_factory.mktemp("gptq") / "m", QuantSpec(sym=False))


@pytest.mark.parametrize("given,want", [
    ((None, None), ("w4bf16", 32)),  # inferred: the checkpoint's bits and group
    (("w4f16", None), ("w4f16", 32)),
    ((None, 16), ("w4bf16", 16)),  # finer groups than the checkpoint's are allowed
])
def test_quantize_and_group_inferred_from_checkpoint(given: tuple, want: tuple):
    assert resolve(*given, INT4_G32) == want
    assert resolve(None, None, None) == ("w4bf16", 64)  # a float checkpoint keeps the defaults
    assert resolve("bf16", 0, None) == ("bf16", 0)  # what was given is kept, for the adapter to judge


@pytest.mark.parametrize("given,message", [
    (("w8bf16", None), "-q w8bf16 contradicts the checkpoint, which is GPTQ int4"),
    (("bf16", None), "-q bf16 contradicts the checkpoint, which is GPTQ int4"),
    ((None, 64), "-g 64 contradicts the checkpoint's group_size 32"),
])
def test_contradicting_options_are_refused(given: tuple, message: str):
    with pytest.raises(SurgeryError, match=message) as caught:
        resolve(*given, INT4_G32)
    assert "\n" not in str(caught.value)


def test_cli_refuses_contradicting_q_with_one_line(gptq: Path, tmp_path: Path):
    surgery = str(Path(sys.executable).with_name("surgery"))
    result = subprocess.run([surgery, "convert", "auto", "-m", str(gptq), "-s", "32", "-q", "w8bf16", "-c", "onnx",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 2 and "error: -q w8bf16 contradicts the checkpoint" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()  # refused before any stage ran


def test_requantizing_a_grid_that_matches_loses_almost_nothing():
    """The emulated compiler quantization is exact on weights already on its grid, and measurably lossy on
    weights whose groups it does not share (act-order, coarser groups)."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=gen)
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group uses both extremes: min/max recovers the grid
    scale, zero = torch.rand(8, 2, 1, generator=gen) + 0.5, 7
    on_grid = ((codes.reshape(8, 2, 32) - zero) * scale).reshape(8, 64)
    assert torch.allclose(requantize(on_grid, 4, 32, symmetric=False), on_grid, atol=1e-5)
    assert not torch.allclose(requantize(on_grid, 4, 64, symmetric=False), on_grid, atol=1e-3)


def test_report_shows_source_and_requantization(gptq: Path, tmp_path: Path):
    out = tmp_path / "bundle"
    convert(ConvertOptions("auto", gptq, out, seq_length=32, chip="onnx", check="none"))
    state = json.loads((out / "convert.json").read_text())
    assert (state["options"]["quantize"], state["options"]["q_group_size"]) == ("w4bf16", "32")
    source = state["stages"]["compile"]["result"]["source"]
    assert source["quantization"]["method"] == "gptq" and source["quantization"]["group_size"] == 32
    assert source["compiler"]["requantizes"] is False  # the onnx adapter keeps the float graphs
    report = (out / "report.md").read_text()
    assert "## Source checkpoint" in report and "GPTQ int4, group 32, asym" in report
    assert "The compiler re-quantizes: no" in report
    manifest = json.loads((out / "stages" / "export" / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"]["quantization"]["bits"] == 4


def test_measured_requantization_cosine_for_a_requantizing_compiler(gptq: Path):
    from surgery.export.checkpoint import open_checkpoint

    config = json.loads((gptq / "config.json").read_text())
    index = open_checkpoint(gptq, config)
    modules = index.modules
    same = measure(index, modules, "sophgo", CompileOptions("bm1684x", "w4bf16", 32))
    coarser = measure(index, modules, "sophgo", CompileOptions("bm1684x", "w4bf16", 64))
    assert same["requantizes"] and same["linears"] == 14
    assert 0.9999 < same["min_cosine"] <= same["mean_cosine"] <= 1.0
    assert coarser["min_cosine"] < same["min_cosine"]  # groups that straddle the checkpoint's cost more
    weights = dequantized_state(gptq)
    worst = weights[f"{same['worst']}.weight"]
    again = requantize(worst, 4, 32, False)
    cosine = torch.nn.functional.cosine_similarity(worst.flatten(), again.flatten(), dim=0)
    assert abs(float(cosine) - same["min_cosine"]) < 1e-6  # measured on the checkpoint's dequantized weights


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_gptq_and_lora_bundles_run_on_mnn(gptq: Path, tmp_path: Path):
    out = tmp_path / "mnn"
    convert(ConvertOptions("auto", gptq, out, seq_length=32, chip="mnn"))
    report = (out / "report.md").read_text()
    assert "14 of 14 quantized Linears are stored with the checkpoint's own codes" in report  # compile/mnn_codes.py
    assert len(open_runtime(out).generate([3, 5, 7, 11], 6).tokens) == 6
    base = build_native("qwen2", tmp_path / "base")
    adapter = build_lora(base, tmp_path / "adapter")
    lora_out = tmp_path / "mnn-lora"
    convert(ConvertOptions("auto", base, lora_out, seq_length=32, chip="mnn", quantize="w8bf16", lora=adapter))
    assert f"LoRA adapter {adapter.resolve()}: r 4, lora_alpha 8" in (lora_out / "report.md").read_text()
    assert (lora_out / "stages" / "apply" / "lora" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run `surgery toolchain install "
                    "sophgo` (make toolchains)")
@pytest.mark.parametrize("spec", [None, QuantSpec(desc_act=True, sym=False),
                                  QuantSpec(desc_act=True, sym=False, calibrated=True)],
                         ids=["gptq", "gptq-actorder", "gptq-actorder-calibrated"])
def test_gptq_blocks_on_the_sophgo_simulator_match_the_dequantized_blocks(spec: QuantSpec | None, gptq: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """TPU-MLIR is handed the checkpoint's codes (compile/tpumlir_codes.py), act-order ones sorted by group
    (export/act_order.py), so every block on the simulator stays >= 0.999 cosine of the dequantized block.
    Measured before either: round-to-nearest codes re-quantized by the compiler 0.9998, act-order ones handed
    over scattered 0.9855, GPTQ-calibrated ones (groups short of codes 0 or 15) re-quantized 0.9962."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # built here, so the build logs say what it did
    model = build_quantized(tmp_path / "m", spec) if spec else gptq
    out = tmp_path / "bm"
    convert(ConvertOptions("auto", model, out, seq_length=32, chip="bm1684x", check="all"))
    result = json.loads((out / "convert.json").read_text())["stages"]["compile"]["result"]
    blocks = [r for r in result["parity"] if r["graph"].startswith("block") and r["output"] == "hidden_states"]
    assert len(blocks) == 4 and min(r["cosine"] for r in blocks) >= 0.999, blocks
    compiler = result["source"]["compiler"]
    assert compiler["regrouped"] == (14 if spec and spec.desc_act else 0)
    assert compiler["kept_codes"] == 14 and compiler["requantizes"] is False
    logs = "".join(p.read_text() for p in (out / "stages" / "compile" / "work").glob("block*/compile.log"))
    assert logs.count("7 MatMul weights handed over as codes") == 4
