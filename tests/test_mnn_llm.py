"""MNN's LLM engine layout (`compile -c mnn`, the default layout): the files and keys the engine reads, and the
engine's own verdict: `MNN.llm.create(config.json)` (in the MNN toolchain's Python, via subprocess) greedy-
decodes the same tokens as transformers on the fixture, and tokenizes as the Hugging Face tokenizer does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import export_native

from surgery.compile.base import CompileOptions
from surgery.compile.mnn import ADAPTER as MNN
from surgery.compile.mnn_runtime import WORKER, MnnLlm
from surgery.compile.toolchains import installed, python_of
from surgery.runtime import open_runtime

NO_MNN = "MNN toolchain absent: run `surgery toolchain install mnn` (make toolchains)"
pytestmark = pytest.mark.skipif(installed("mnn") is None, reason=NO_MNN)
SURGERY = str(Path(sys.executable).with_name("surgery"))
PROMPT = [5, 17, 42, 7, 99, 3]
ENGINE_FILES = {"config.json", "llm_config.json", "llm.mnn", "llm.mnn.weight", "tokenizer.txt"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnn-llm")
    export_native("qwen2", root)
    return root


@pytest.fixture(scope="module")
def fp32(root: Path) -> Path:
    MNN.compile(root / "onnx", root / "fp32", CompileOptions("mnn", "fp32", 32))
    return root / "fp32"


def transformers_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_files_and_keys_the_engine_reads(fp32: Path):
    config = json.loads((fp32 / "config.json").read_text())
    llm = json.loads((fp32 / "llm_config.json").read_text())
    assert ENGINE_FILES | {"embeddings_bf16.bin"} <= {p.name for p in fp32.iterdir()}
    assert not [p.name for p in fp32.glob("*.mnn") if p.name != "llm.mnn"]  # one graph, not one per block
    assert (config["llm_model"], config["llm_weight"], config["tokenizer_file"], config["embedding_file"]) == (
        "llm.mnn", "llm.mnn.weight", "tokenizer.txt", "embeddings_bf16.bin")
    assert (llm["hidden_size"], llm["layer_nums"], llm["attention_mask"], llm["model_type"]) == (64, 2, "float",
                                                                                                    "qwen2")
    assert llm["jinja"]["chat_template"] and "tie_embeddings" not in llm  # float weights: the bf16 table
    assert (fp32 / "embeddings_bf16.bin").stat().st_size == 512 * 64 * 2  # raw bf16 [vocab, hidden]
    assert (fp32 / "tokenizer.txt").read_text().splitlines()[0] == "430 3"  # magic, HUGGINGFACE (byte BPE)
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["compiled"]["details"]["layout"] == "llm"
    assert set(manifest["compiled"]["files"]) == ENGINE_FILES | {"embeddings_bf16.bin"}
    assert manifest["compiled"]["parity"][0]["cosine"] >= 0.9999  # engine logits vs onnxruntime's


def test_engine_greedy_equals_transformers(root: Path, fp32: Path):
    got = MnnLlm(fp32).engine(PROMPT, 20)  # MNN.llm.create(config.json) in the MNN env
    assert got["tokens"] == transformers_greedy(root / "src", PROMPT, 20)


def test_engine_tokenizer_equals_hugging_face(root: Path, fp32: Path):
    from transformers import AutoTokenizer

    text = "Hello, how are you today? The quick brown fox jumps over the lazy dog.\nEdge NPUs run static graphs."
    done = subprocess.run([str(python_of("mnn")), str(WORKER), "encode", str(fp32 / "config.json"), text],
                          capture_output=True, text=True, check=True)
    want = AutoTokenizer.from_pretrained(root / "src")(text)["input_ids"]
    assert json.loads(done.stdout.splitlines()[-1])["ids"] == want


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_other_families(tmp_path: Path, family: str):
    """GQA with a tied head (llama), q/k norms and an untied head (qwen3): same tokens as transformers."""
    onnx_dir = export_native(family, tmp_path)
    MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", "fp32", 32, check="none"))
    assert MnnLlm(tmp_path / "mnn").engine(PROMPT, 16)["tokens"] == transformers_greedy(tmp_path / "src", PROMPT, 16)


def export_qwen(root: Path, revision: str, seq: int = 32) -> Path:
    """The tiny Qwen-v1 remote-code fixture in one upstream revision style, patched by the qwen pack and exported."""
    from surgery.apply import plan_apply, write_plan
    from surgery.export.exporter import ExportOptions, export_model
    from surgery.fixtures.qwen_v1 import build
    from surgery.packs import ApplyOptions, get_pack

    src = build(root / "src", revision=revision)
    write_plan(plan_apply(get_pack("qwen"), src, ApplyOptions(seq_length=seq, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=seq, trust_remote_code=True))
    return root / "onnx"


def qwen_greedy(src: Path, work: Path, prompt: list[int], n: int, bf16_embedding: bool = False) -> list[int]:
    """transformers' greedy tokens for the unpatched Qwen-v1 model (only the pack's load fixes; full recompute,
    since generate() in transformers 5 rejects its tuple caches). `bf16_embedding`: its embedding rounded to
    bf16 first, as the engine reads it from embeddings_bf16.bin (every other weight stays fp32)."""
    from surgery.conformance import greedy, original_model
    from surgery.packs import get_pack

    model = original_model(get_pack("qwen"), src, work)
    if bf16_embedding:
        with torch.no_grad():
            model.transformer.wte.weight.copy_(model.transformer.wte.weight.to(torch.bfloat16).float())
    return greedy(model, prompt, n)


@pytest.mark.parametrize("revision", ["2023-11", "2023-12"])
def test_qwen_v1_remote_code(tmp_path: Path, revision: str):
    """Qwen-v1 remote code (fused c_attn, its own RotaryEmbedding, `QWenAttention._attn` as the core, BSHD):
    the engine greedy-decodes transformers' tokens. The bf16 embedding file moves one near tie of the fixture
    (4.461 vs 4.449 at token 18 of this prompt), so the whole run is compared with the embedding as stored and
    the fp32 model is matched for the first 16 tokens."""
    onnx_dir = export_qwen(tmp_path, revision)
    manifest = MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", "fp32", 32))
    assert manifest.compiled.parity[0]["cosine"] >= 0.9999  # engine logits vs onnxruntime's
    llm = json.loads((tmp_path / "mnn" / "llm_config.json").read_text())
    assert (llm["model_type"], llm["hidden_size"], llm["layer_nums"]) == ("qwen", 64, 2)
    assert "<|im_start|>" in llm["jinja"]["chat_template"] and llm["jinja"]["eos"] == "<|im_end|>"  # ChatML
    assert (tmp_path / "mnn" / "tokenizer.txt").read_text().splitlines()[0] == "430 3"  # byte-level BPE
    got = MnnLlm(tmp_path / "mnn").engine(PROMPT, 24)["tokens"]
    assert got == qwen_greedy(tmp_path / "src", tmp_path / "work", PROMPT, 24, bf16_embedding=True)
    assert got[:16] == qwen_greedy(tmp_path / "src", tmp_path / "work", PROMPT, 16)


def test_pack_without_engine_spec_is_refused():
    """A pack whose ArchSpec declares no engine spec gets one line pointing at --layout graphs."""
    from dataclasses import replace

    from surgery.errors import SurgeryError
    from surgery.export.engine import EngineGraph
    from surgery.patches.native_rules import NATIVE_SPEC

    with pytest.raises(SurgeryError, match="--layout graphs"):
        EngineGraph(replace(NATIVE_SPEC, engine=None), torch.nn.Module(), "chatglm")


def dequantized_rows(weight_file: Path, tie: list[int], vocab: int, hidden: int) -> np.ndarray:
    """The embedding as the engine's DiskEmbedding decodes it from `tie_embeddings` (diskembedding.cpp:
    4-bit values high nibble first, `q * scale + zero`, zero = alpha0 - 8 * scale for (alpha0, scale) pairs)."""
    offset, alpha_offset, alpha_size, bits, block = tie
    assert bits == 4
    raw = np.fromfile(weight_file, np.uint8, vocab * hidden // 2, offset=offset)
    q = np.stack([raw >> 4, raw & 15], -1).reshape(vocab, hidden // block, block).astype(np.float32)
    alpha = np.fromfile(weight_file, "<f4", alpha_size // 4, offset=alpha_offset).reshape(vocab, hidden // block, -1)
    if alpha.shape[-1] == 2:
        return (q * alpha[..., 1:] + (alpha[..., :1] - 8 * alpha[..., 1:])).reshape(vocab, hidden)
    return ((q - 8) * alpha).reshape(vocab, hidden)


@pytest.mark.parametrize("symmetric", [False, True])
def test_4bit_head_is_the_embedding(root: Path, fp32: Path, symmetric: bool):
    """A tied head at 4 bits: no bf16 table; the engine's reader decodes the head's rows to the embedding
    (within half a quantization step), and the engine still generates."""
    from safetensors import safe_open

    out = root / f"w4-{symmetric}"
    manifest = MNN.compile(root / "onnx", out, CompileOptions("mnn", "w4bf16", 32, symmetric=symmetric))
    assert manifest.compiled.details["weight_quant_bits"] == 4 and manifest.compiled.parity[0]["cosine"] >= 0.85
    tie = json.loads((out / "llm_config.json").read_text())["tie_embeddings"]
    assert tie[3:] == [4, 32] and not (out / "embeddings_bf16.bin").exists()
    assert "embeddings_bf16.bin" not in manifest.compiled.files
    with safe_open(str(root / "src" / "model.safetensors"), "pt") as fh:
        table = fh.get_tensor("model.embed_tokens.weight").numpy()
    rows = dequantized_rows(out / "llm.mnn.weight", tie, 512, 64)
    step = np.abs(table).max() / 7 if symmetric else (table.max(1) - table.min(1)).max() / 15  # one level
    assert np.abs(rows - table).max() <= step / 2 + 1e-5
    assert len(MnnLlm(out).engine(PROMPT, 16)["tokens"]) == 16
    assert (out / "llm.mnn.weight").stat().st_size < (fp32 / "llm.mnn.weight").stat().st_size / 4


def test_cli_run_uses_the_engine(fp32: Path):
    ran = subprocess.run([SURGERY, "run", str(fp32), "--backend", "mnn", "--prompt-ids", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", "8", "--json"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["backend"] == "mnn" and result["tokens"] == MnnLlm(fp32).engine(PROMPT, 8)["tokens"]
    assert type(open_runtime(fp32)) is MnnLlm


@pytest.mark.parametrize("family", ["qwen-v1", "qwen3"])
def test_quantized_linears_written_by_us_are_what_mnn_reads(tmp_path: Path, family: str):
    """8-bit engine graphs whose linear weights never went through MNNConvert (compile/mnn_weights.py wrote
    them, one layer resident): fused c_attn with bias and an untied head (Qwen-v1), q/k norms (qwen3). MNN's
    own engine decodes them to logits matching onnxruntime's fp32 graphs."""
    onnx_dir = export_qwen(tmp_path, "2023-12") if family == "qwen-v1" else export_native(family, tmp_path)
    manifest = MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", "w8bf16", 32))
    assert manifest.compiled.details["linear_weights_written_by"].startswith("surgery")
    assert manifest.compiled.parity[0]["cosine"] >= 0.999
    assert len(MnnLlm(tmp_path / "mnn").engine(PROMPT, 8)["tokens"]) == 8
