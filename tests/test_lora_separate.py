"""`--lora-mode separate` on MNN: the adapter becomes `lora.mnn`, which MNN's engine loads over the loaded
base model (`Llm::create_lora`, compile/mnn_lora.py). The engine with it computes the merged model, without
it the base model; targets whose runtime cannot load an adapter beside the base refuse in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery.compile.base import CompileOptions
from surgery.compile.mnn_runtime import MnnLlm
from surgery.compile.registry import adapter_for
from surgery.compile.toolchains import installed
from surgery.convert import ConvertOptions, convert
from surgery.errors import SurgeryError
from surgery.export.engine_reference import prefill_logits
from surgery.fixtures.lora import build_lora
from surgery.fixtures.native import build_native

PROMPT = [3, 5, 7, 11, 13, 17, 19, 23, 29, 31]


@pytest.mark.parametrize("chip,options,message", [
    ("bm1684x", {}, "surgery writes a separate adapter only for MNN's LLM engine"),
    ("onnx", {"quantize": "bf16"}, "for onnx use --lora-mode merged"),
    ("mnn", {"layout": "graphs"}, "needs the engine layout"),
    ("mnn", {"quantize": "bf16"}, "and 4- or 8-bit weights"),
])
def test_targets_that_cannot_load_a_separate_adapter_refuse(chip: str, options: dict, message: str):
    with pytest.raises(SurgeryError, match=message) as caught:
        adapter_for(chip).validate(CompileOptions(chip, lora="/some/adapter", **options))
    assert "\n" not in str(caught.value)
    adapter_for(chip).validate(CompileOptions(chip, **options))  # the same options without it are fine


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_engine_with_lora_mnn_is_the_merged_model_and_without_it_the_base(tmp_path: Path):
    base = build_native("qwen2", tmp_path / "base")
    adapter = build_lora(base, tmp_path / "adapter")
    separate, merged = tmp_path / "separate", tmp_path / "merged"
    common = {"seq_length": 32, "chip": "mnn", "quantize": "w8bf16", "lora": adapter}
    convert(ConvertOptions("auto", base, separate, lora_mode="separate", **common))
    convert(ConvertOptions("auto", base, merged, **common))
    manifest = json.loads((separate / "manifest.json").read_text())
    assert "lora.mnn" in manifest["compiled"]["files"] and (separate / "lora.mnn").is_file()
    assert not (separate / "stages" / "apply" / "lora").exists()  # the base model is exported unmerged
    assert "exported beside the base model as lora.mnn" in (separate / "report.md").read_text()
    rows = json.loads((separate / "convert.json").read_text())["stages"]["compile"]["result"]["parity"]
    assert [r["graph"] for r in rows] == ["llm", "lora.mnn"] and min(r["cosine"] for r in rows) > 0.995

    patched = separate / "stages" / "apply"
    want = {"base": prefill_logits(patched, PROMPT, True, bf16_rows=True),
            "merged": prefill_logits(patched, PROMPT, True, bf16_rows=True, adapter=adapter)}
    assert _cosine(want["base"], want["merged"]) < 0.99  # the adapter changes the model measurably
    engine = MnnLlm(separate)
    with_lora, without = engine.engine(PROMPT, 12, lora="lora.mnn"), engine.engine(PROMPT, 12)
    got = {"lora": np.asarray(with_lora["logits"], np.float32), "base": np.asarray(without["logits"], np.float32)}
    assert _cosine(got["lora"], want["merged"]) > 0.995 > _cosine(got["lora"], want["base"])
    assert _cosine(got["base"], want["base"]) > 0.995 > _cosine(got["base"], want["merged"])
    assert with_lora["tokens"] == MnnLlm(merged).engine(PROMPT, 12)["tokens"]  # measured: all 12 equal
    assert with_lora["tokens"] != without["tokens"]
    assert engine.generate(PROMPT, 12, lora="lora.mnn").tokens == with_lora["tokens"]  # `surgery run --lora`


def test_cli_refuses_separate_for_sophgo_before_any_stage(tmp_path: Path):
    import os
    import subprocess
    import sys

    base = build_native("qwen2", tmp_path / "base")
    adapter = build_lora(base, tmp_path / "adapter")
    surgery = str(Path(sys.executable).with_name("surgery"))
    done = subprocess.run([surgery, "convert", "auto", "-m", str(base), "--lora", str(adapter), "--lora-mode",
                           "separate", "-s", "32", "-c", "bm1684x", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 2 and "for bm1684x use --lora-mode merged" in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out").exists()
