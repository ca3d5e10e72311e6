"""GPTQ / AWQ checkpoints read as float: our fixture packs codes the way the formats store them, and the
reader returns exactly what each format's reference dequantization computes (written out here, element
by element with numpy, independently of export/dequant.py's reshapes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_reference import reference_awq, reference_gptq
from safetensors.torch import load_file, save_file

from surgery.errors import SurgeryError
from surgery.export.checkpoint import open_checkpoint
from surgery.export.quant_config import detect
from surgery.fixtures.native import build_native
from surgery.fixtures.quantized import LINEARS, QuantSpec, build_quantized

SPECS = {
    "gptq4-sym": QuantSpec(),
    "gptq4-asym-actorder": QuantSpec(desc_act=True, sym=False),
    "gptq8-v2-quantize_config.json": QuantSpec(bits=8, packing="gptq_v2", in_config=False),
    "gptq4-per-channel": QuantSpec(group_size=-1, sym=False),
    "awq4-gemm": QuantSpec(method="awq", sym=False, packing="gemm"),
}


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return load_file(str(build_native("qwen2", tmp_path_factory.mktemp("float") / "m") / "model.safetensors"))


@pytest.fixture(scope="module", params=list(SPECS))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, QuantSpec]:
    spec = SPECS[request.param]
    return build_quantized(tmp_path_factory.mktemp(request.param) / "m", spec), spec


def test_reader_equals_reference_dequantization(quantized: tuple[Path, QuantSpec], float_weights: dict):
    model, spec = quantized
    stored = load_file(str(model / "model.safetensors"))
    index = open_checkpoint(model, json.loads((model / "config.json").read_text()))
    linears = sorted(k[: -len(".qweight")] for k in stored if k.endswith(".qweight"))
    assert len(linears) == 2 * len(LINEARS) and not any(k.endswith("proj.weight") for k in stored)
    for module in linears:
        parts = {p: stored[f"{module}.{p}"].numpy() for p in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{module}.{p}" in stored}
        if spec.method == "awq":
            want = reference_awq(parts, spec.group_size)
        else:
            want = reference_gptq(parts, spec.bits, v1=spec.packing == "gptq")
        got = index.read([f"{module}.weight"])[f"{module}.weight"]
        np.testing.assert_array_equal(got.numpy(), want)  # exact: the same integers times the same fp16 scales
        original = float_weights[f"{module}.weight"].flatten()
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), original, dim=0)
        assert cosine > (0.9999 if spec.bits == 8 else 0.99), f"{module}: packing does not hold the weights"
    # everything else reads as stored (fp16)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(index.read([norm])[norm], stored[norm])


def test_act_order_permutes_groups(tmp_path: Path):
    spec = SPECS["gptq4-asym-actorder"]
    model = build_quantized(tmp_path / "m", spec)
    g_idx = load_file(str(model / "model.safetensors"))["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(len(g_idx)) // spec.group_size)
    assert torch.bincount(g_idx).tolist() == [spec.group_size] * (len(g_idx) // spec.group_size)


def test_gptq_v1_zero_is_stored_minus_one(tmp_path: Path):
    """Codes 0..7 in one input column, zero 3 stored as 2, scale 0.5: weights (code - 3) * 0.5."""
    model = tmp_path / "m"
    model.mkdir()
    word = sum(c << (4 * c) for c in range(8))  # input channels 0..7 hold codes 0..7; 8 equal output channels
    qweight = torch.tensor([[word - 2**32 if word >= 2**31 else word] * 8], dtype=torch.int32)
    zeros = int(sum(2 << (4 * i) for i in range(8)))
    save_file({"l.qweight": qweight, "l.qzeros": torch.tensor([[zeros]], dtype=torch.int32),
               "l.scales": torch.full((1, 8), 0.5, dtype=torch.float16),
               "l.g_idx": torch.zeros(8, dtype=torch.int32)}, str(model / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 8, "sym": False}}
    weight = open_checkpoint(model, config).read(["l.weight"])["l.weight"]
    assert weight.shape == (8, 8) and weight[0].tolist() == [(c - 3) * 0.5 for c in range(8)]
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    v2 = open_checkpoint(model, config).read(["l.weight"])["l.weight"]
    assert v2[0].tolist() == [(c - 2) * 0.5 for c in range(8)]


@pytest.mark.parametrize("declared,message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin' is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits 8 is not supported for AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size 0 must be"),
])
def test_unsupported_quantization_is_refused_by_field(tmp_path: Path, declared: dict, message: str):
    with pytest.raises(SurgeryError, match=message) as caught:
        detect(tmp_path, {"quantization_config": declared})
    assert "\n" not in str(caught.value) and "quantization_config" in str(caught.value)


def test_declaration_without_packed_tensors_is_refused(tmp_path: Path):
    model = build_native("qwen2", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    with pytest.raises(SurgeryError, match=r"weights hold no \*\.qweight tensor"):
        open_checkpoint(model, config)


def test_quantized_head_reads_by_rows_without_its_shape_costing_a_dequantization(tmp_path: Path):
    model = build_quantized(tmp_path / "m", QuantSpec(head=True), family="qwen3")
    index = open_checkpoint(model, json.loads((model / "config.json").read_text()))
    calls = []
    derive = index.derive
    index.derive = lambda name: calls.append(name) or derive(name)
    assert index.shape("lm_head.weight") == [512, 64] and calls == []  # from qweight's shape
    whole = derive("lm_head.weight")
    chunks = [index.rows("lm_head.weight", start, start + 100) for start in range(0, 512, 100)]
    assert torch.equal(torch.cat(chunks), whole) and calls == ["lm_head.weight"]  # dequantized once
    with index.open("lm_head.weight") as view:
        assert torch.equal(view[3:5], whole[3:5])


def test_one_module_reads_only_its_own_tensors(tmp_path: Path):
    """Streaming: dequantizing a Linear reads that Linear's packed tensors and nothing else."""
    model = build_quantized(tmp_path / "m", QuantSpec())
    index = open_checkpoint(model, json.loads((model / "config.json").read_text()))
    asked: list[str] = []
    read = index.base.read
    index.base.read = lambda names: (names := list(names), asked.extend(names), read(names))[2]
    index.read(["model.layers.1.mlp.up_proj.weight", "model.layers.1.post_attention_layernorm.weight"])
    prefix = "model.layers.1.mlp.up_proj."
    assert sorted(asked) == sorted([f"{prefix}{p}" for p in ("qweight", "qzeros", "scales", "g_idx")]
                                   + ["model.layers.1.post_attention_layernorm.weight"])
