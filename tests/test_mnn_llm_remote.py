"""MNN's engine layout for the remote-code families whose attention core is inline code (export/engine_remote.py):
InternLM2 (grouped wqkv, GQA, dynamic NTK), MiniCPM (muP embedding scale and head divisor, applied inside the
engine graph), Baichuan2-7B (W_pack, NormHead folded into the head's rows) and ChatGLM2/3 ([S, B, H] layout,
multi-query attention, rotary on half of each head). `MNN.llm.create(config.json)` greedy-decodes the original
remote-code model's tokens in fp32, and an 8-bit compile passes its own check. Baichuan2-13B (ALiBi) is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.compile.base import CompileOptions
from surgery.compile.mnn import ADAPTER as MNN
from surgery.compile.mnn_runtime import MnnLlm
from surgery.compile.toolchains import installed

NO_MNN = "MNN toolchain absent: run `surgery toolchain install mnn`"
pytestmark = pytest.mark.skipif(installed("mnn") is None, reason=NO_MNN)
PROMPT = [5, 17, 42, 7, 99, 3]
CASES = [("internlm2", "2024-01"), ("minicpm", "2024-02"), ("baichuan", "7b"), ("chatglm", "2023-07")]


def export_remote(root: Path, pack: str, revision: str, seq: int = 32) -> Path:
    """A family's tiny remote-code fixture, patched by its pack and exported for the engine layout (no graphs)."""
    from importlib import import_module

    from surgery.apply import plan_apply, write_plan
    from surgery.export.exporter import ExportOptions, export_model
    from surgery.packs import ApplyOptions, get_pack

    build = import_module(f"surgery.fixtures.{pack}").build
    src = build(root / "src", revision=revision)
    write_plan(plan_apply(get_pack(pack), src, ApplyOptions(seq_length=seq, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=seq, trust_remote_code=True,
                                                                graphs=False))
    return root / "onnx"


def original_greedy(pack: str, src: Path, work: Path, n: int, bf16_embedding: bool = False) -> list[int]:
    """The unpatched remote-code model's greedy tokens (only the pack's load fixes; full recompute).
    `bf16_embedding`: its embedding rounded to bf16 first, as the engine reads it from embeddings_bf16.bin."""
    from surgery.conformance import greedy, original_model
    from surgery.packs import get_pack

    model = original_model(get_pack(pack), src, work)
    if bf16_embedding:
        table = model.get_input_embeddings().weight
        with torch.no_grad():
            table.copy_(table.to(torch.bfloat16).float())
    return greedy(model, PROMPT, n)


# how many of the plain fp32 model's tokens the engine matches: ChatGLM's fixture has a near tie at the first
# token of this prompt (370 over 293 by 0.0014) that the bf16 embedding table flips
FP32_PREFIX = {"internlm2": 16, "minicpm": 16, "baichuan": 16, "chatglm": 0}


def engine_check(directory: Path, memory: str) -> float:
    """The bundle's own check (compile/mnn.py `check_llm`) rerun with config.json's `memory` set."""
    from surgery.compile.mnn import check_llm

    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"memory": memory}))
    return check_llm(Path(json.loads((directory / "manifest.json").read_text())["source"]["model_dir"]),
                     directory, 512)[0].cosine


@pytest.mark.parametrize("pack,revision", CASES, ids=[p for p, _ in CASES])
def test_engine_decodes_the_original_tokens(tmp_path: Path, pack: str, revision: str):
    """fp32: every token of the original model with its embedding as the bundle stores it (bf16), and the plain
    fp32 model's up to FP32_PREFIX. 8-bit: the compile's own check passes; with the engine's defaults
    (`memory` low, as llmexport writes it: MNN then quantizes activations too) these sharp fixtures measure
    0.998; the weights we wrote, with activations in float (`memory` high), 0.999."""
    onnx_dir = export_remote(tmp_path, pack, revision)
    manifest = MNN.compile(onnx_dir, tmp_path / "fp32", CompileOptions("mnn", "fp32", 32))
    assert manifest.compiled.parity[0]["cosine"] >= 0.99999  # engine logits vs the patched model's own
    llm = json.loads((tmp_path / "fp32" / "llm_config.json").read_text())
    assert (llm["model_type"], llm["layer_nums"]) == (pack, 2)
    got = MnnLlm(tmp_path / "fp32").engine(PROMPT, 16)["tokens"]
    want = original_greedy(pack, tmp_path / "src", tmp_path / "work", 16, bf16_embedding=True)
    assert len(set(want)) >= 6, "fixture too degenerate for a token test"
    assert got == want
    plain = original_greedy(pack, tmp_path / "src", tmp_path / "work", 16)
    n = FP32_PREFIX[pack]
    assert got[:n] == plain[:n] and (n == 16 or got[n] != plain[n])  # the documented count, exactly
    w8 = MNN.compile(onnx_dir, tmp_path / "w8", CompileOptions("mnn", "w8bf16", 32))
    assert w8.compiled.parity[0]["cosine"] >= 0.998
    assert engine_check(tmp_path / "w8", "high") >= 0.999
    size = {name: (tmp_path / name / "llm.mnn.weight").stat().st_size for name in ("fp32", "w8")}
    assert size["w8"] < size["fp32"] / 2.8  # every linear at 8 bits, Baichuan2's NormHead too (~1/3.2 of fp32)


def test_minicpm_scales_are_inside_the_engine_graph(tmp_path: Path):
    """The engine feeds raw embedding rows (embeddings_bf16.bin) and returns the graph's logits, so scale_emb
    and the dim_model_base divisor must be in the graph: the fixture's are far from 1, and the same graph
    without them computes other logits, which the token test above would catch."""
    from dataclasses import replace

    from surgery.export import engine_reference
    from surgery.patches.minicpm import EXPORT_SPEC

    export_remote(tmp_path, "minicpm", "2024-02")
    config = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert config["scale_emb"] != 1 and config["dim_model_base"] != config["hidden_size"]
    with_scales = engine_reference.prefill_logits(tmp_path / "patched", PROMPT, trust_remote_code=True)
    plain = replace(EXPORT_SPEC, embedding_scale=None, head_divisor=None)
    original = engine_reference.export_spec_for
    engine_reference.export_spec_for = lambda model_type: plain
    try:
        without = engine_reference.prefill_logits(tmp_path / "patched", PROMPT, trust_remote_code=True)
    finally:
        engine_reference.export_spec_for = original
    assert abs(with_scales - without).max() > 0.1 * abs(with_scales).max()


def test_baichuan_13b_alibi_is_refused_in_one_line(tmp_path: Path):
    from surgery.errors import SurgeryError

    onnx_dir = export_remote(tmp_path, "baichuan", "13b")
    with pytest.raises(SurgeryError, match="ALiBi.*--layout graphs") as refused:
        MNN.compile(onnx_dir, tmp_path / "mnn", CompileOptions("mnn", "fp32", 32, check="none"))
    assert "\n" not in str(refused.value)


class Glm3Rotary(torch.nn.Module):
    """Upstream ChatGLM3's RotaryEmbedding as its modeling file writes it: `inv_freq` in the model's dtype,
    `forward_impl` recomputing theta in fp32 from `base * rope_ratio`."""

    def __init__(self, dim: int, rope_ratio: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype) / dim)))
        self.dim, self.rope_ratio = dim, rope_ratio

    def forward_impl(self, seq_len: int, n_elem: int, dtype, device, base: int = 10000) -> torch.Tensor:
        base = base * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float), theta).float()
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, max_seq_len: int) -> torch.Tensor:
        return self.forward_impl(max_seq_len, self.dim, dtype=self.inv_freq.dtype, device=self.inv_freq.device)


def test_chatglm_rope_rows_are_the_modules_own_at_any_position():
    """The engine's ChatGLM rows at absolute positions equal the module's own table (ChatGLM3-32k's rope_ratio
    50, a bf16 checkpoint), which its bf16 `inv_freq` buffer would miss by far at position 3000."""
    from surgery.export.engine_remote import chatglm_rope

    rotary = Glm3Rotary(32, 50.0, torch.bfloat16)
    positions = torch.tensor([[0, 7, 3000]], dtype=torch.int32)
    cos, sin = chatglm_rope(rotary, torch.zeros(1, 3, 8), positions)
    table = rotary(3001)[positions[0].long()]
    assert torch.allclose(cos[0], table[..., 0], atol=1e-3) and torch.allclose(sin[0], table[..., 1], atol=1e-3)
    wrong = (3000 * rotary.inv_freq.float() / 50 ** (torch.arange(0, 32, 2) / 32)).cos()
    assert (wrong - table[2, :, 0]).abs().max() > 0.1
