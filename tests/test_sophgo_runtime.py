"""A Sophgo bundle run the way LLM-TPU's runtime runs it: the combined bmodel driven by net name through
TPU-MLIR's runtime library (the CPU-simulator build in its wheel), the KV history in the cache nets' input
buffers; greedy and sampling with top_k=1 must give transformers' greedy tokens."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import export_native

from surgery.compile.base import CompileOptions
from surgery.compile.toolchains import bin_env, installed
from surgery.optimize import optimize_dir
from surgery.runtime import OnnxModel, Sampling, open_runtime

pytestmark = pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent")
SEQ, PROMPT, NEW = 32, [5, 17, 42, 7, 99, 3], 12


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sophgo-runtime")
    onnx_dir = export_native("qwen2", root, SEQ)
    reference = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32).generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False)[0, len(PROMPT):].tolist()
    assert len(set(reference)) >= 8, "fixture too degenerate for a token test"
    optimize_dir(onnx_dir, "bm1684x", keep=False)  # LLM-TPU's layout: final norm in the last block
    return onnx_dir, reference


@pytest.mark.parametrize("quantize", ["f16", "bf16"])
def test_bundle_generates_transformers_tokens_through_the_runtime(fixture, tmp_path: Path, quantize: str):
    from surgery.compile.sophgo import ADAPTER as SOPHGO

    onnx_dir, reference = fixture
    SOPHGO.compile(onnx_dir, tmp_path / "bm", CompileOptions("bm1684x", quantize, check="none"))
    model = open_runtime(tmp_path / "bm")
    assert model.generate(PROMPT, NEW).tokens == reference
    assert model.generate(PROMPT, NEW, sampling=Sampling(top_k=1)).tokens == reference
    # the exported graphs' own sample_head agrees: the same contract on onnxruntime
    assert OnnxModel(onnx_dir).generate(PROMPT, NEW, sampling=Sampling(top_k=1)).tokens == reference


def test_runtime_layout_and_cli(fixture, tmp_path: Path):
    """The nets LLM-TPU's runtime looks up, nothing else (it counts layers from the net count), and
    `surgery run --backend bmodel --sample` on the bundle."""
    from surgery.compile.sophgo import ADAPTER as SOPHGO

    onnx_dir, reference = fixture
    SOPHGO.compile(onnx_dir, tmp_path / "bm", CompileOptions("bm1684x", "f16", check="none"))
    bmodel = next((tmp_path / "bm").glob("*.bmodel"))
    info = subprocess.run(["model_tool", "--info", str(bmodel)], env=bin_env("sophgo"), capture_output=True,
                          text=True, check=True).stdout
    nets = re.findall(r"^net \d+: \[(\w+)\]", info, re.M)
    assert sorted(nets) == sorted(["embedding", "embedding_cache", "lm_head", "greedy_head", "sample_head",
                                   "block_0", "block_cache_0", "block_1", "block_cache_1"])
    assert (len(nets) - 3 - 2) // 2 == 2  # the runtime's layer count
    sample_head = info.split("[sample_head]")[1].split("net ")[0]
    order = re.findall(r"input: (\w+),", sample_head)
    assert order == ["m_logits", "input_ids", "penalty", "temperature", "top_k", "top_p"]
    assert "dynamic" in info.split("[sample_head]")[1].splitlines()[0]
    cache_out = info.split("[embedding_cache]")[1].split("net ")[0]
    assert re.search(r"output: .*, (bfloat16|float16)", cache_out), "the runtime picks the mask dtype from this"
    done = subprocess.run([str(Path(sys.executable).with_name("surgery")), "run", str(tmp_path / "bm"),
                           "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--sample",
                           "--top-k", "1", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == reference and json.loads(done.stdout)["backend"] == "bmodel"
