"""A GPTQ/AWQ checkpoint's own codes in MNN's block storage: what MNN's loader decodes is exactly the
checkpoint's dequantized weight, and a bundle built from them matches the dequantized model far better
than one MNN re-quantized."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import decode_mnn_linear

from surgery.compile.mnn_codes import codes_of, write_codes
from surgery.compile.mnn_weights import write_linear
from surgery.compile.toolchains import installed
from surgery.convert import ConvertOptions, convert
from surgery.export.act_order import RegroupedIndex, plan
from surgery.export.checkpoint import open_checkpoint
from surgery.fixtures.quantized import QuantSpec, build_quantized

SPECS = {"gptq4-sym": QuantSpec(), "gptq4-asym": QuantSpec(sym=False),
         "gptq8-v2": QuantSpec(bits=8, packing="gptq_v2", group_size=64),
         "awq4": QuantSpec(method="awq", sym=False, packing="gemm")}


def test_decoder_reads_mnn_weights_own_storage():
    """The test's decoder agrees with the float writer compile/mnn_weights.py uses for MNN (so it reads the
    format MNN reads): a quantized float weight decodes to within one quantization step."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    file = io.BytesIO()
    external, _ = write_linear(file, weight, None, 4, 32, symmetric=False)
    got, _ = decode_mnn_linear(file.getvalue(), external, 16, 64, 4, 32)
    step = (weight.reshape(16, 2, 32).amax(-1) - weight.reshape(16, 2, 32).amin(-1)) / 15
    assert np.all(np.abs(got - weight.numpy()).reshape(16, 2, 32) <= step.numpy()[..., None] / 2 + 1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_stored_codes_decode_to_the_checkpoint_weights_exactly(name: str, tmp_path: Path):
    spec = SPECS[name]
    model = build_quantized(tmp_path / "m", spec)
    index = open_checkpoint(model, json.loads((model / "config.json").read_text()))
    for module in index.modules:
        codes = codes_of(index, module)
        assert codes is not None and codes.group == spec.group_size and codes.bits == spec.bits
        file = io.BytesIO()
        external, _ = write_codes(file, codes, None)
        decoded, _ = decode_mnn_linear(file.getvalue(), external, *codes.codes.shape, spec.bits, codes.group)
        np.testing.assert_array_equal(decoded, index.read([f"{module}.weight"])[f"{module}.weight"].numpy())


def test_act_order_codes_are_handed_over_regrouped(tmp_path: Path):
    """Scattered groups cannot be MNN blocks; sorted by group as export hands the weights over
    (export/act_order.py), the permuted codes decode exactly to the regrouped weights."""
    model = build_quantized(tmp_path / "m", QuantSpec(desc_act=True, sym=False))
    index = open_checkpoint(model, json.loads((model / "config.json").read_text()))
    assert all(codes_of(index, module) is None for module in index.modules)
    regroup = plan(index)
    regrouped = RegroupedIndex(index, regroup)
    for module in index.modules:
        codes = codes_of(index, module, regroup)
        assert codes is not None and codes.group == 32
        file = io.BytesIO()
        external, _ = write_codes(file, codes, None)
        decoded, _ = decode_mnn_linear(file.getvalue(), external, *codes.codes.shape, 4, codes.group)
        np.testing.assert_array_equal(decoded, regrouped.read([f"{module}.weight"])[f"{module}.weight"].numpy())


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_mnn_bundle_keeps_the_checkpoint_codes(tmp_path: Path):
    """qwen3 (untied head) with every Linear, the head too, GPTQ int4 g32: the engine's logits against the
    dequantized model are near float (measured 0.99987); at -g 16 MNN re-quantizes them (measured 0.978)."""
    model = build_quantized(tmp_path / "m", QuantSpec(head=True), family="qwen3")
    results = {}
    for name, options in (("codes", {}), ("requantized", {"q_group_size": 16})):
        convert(ConvertOptions("auto", model, tmp_path / name, seq_length=32, chip="mnn", **options))
        results[name] = json.loads((tmp_path / name / "convert.json").read_text())["stages"]["compile"]["result"]
    kept, again = results["codes"], results["requantized"]
    assert kept["source"]["compiler"]["kept_codes"] == 15 and kept["source"]["compiler"]["requantizes"] is False
    assert again["source"]["compiler"]["kept_codes"] == 0 and again["source"]["compiler"]["requantizes"]
    assert kept["parity"][0]["cosine"] > 0.9995 > 0.99 > again["parity"][0]["cosine"]
    assert "15 of 15 quantized Linears are stored with the checkpoint's own codes" in (
        tmp_path / "codes" / "report.md").read_text()


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_mnn_bundle_keeps_act_order_codes(tmp_path: Path):
    """An act-order checkpoint's linears, regrouped at export, keep their codes in the engine bundle (measured
    engine logits 0.977 against the dequantized model, the tied head quantized by MNN; 0.964 when they were
    re-quantized with scattered groups)."""
    model = build_quantized(tmp_path / "m", QuantSpec(desc_act=True, sym=False))
    convert(ConvertOptions("auto", model, tmp_path / "out", seq_length=32, chip="mnn"))
    result = json.loads((tmp_path / "out" / "convert.json").read_text())["stages"]["compile"]["result"]
    compiler = result["source"]["compiler"]
    assert compiler["kept_codes"] == 14 and compiler["regrouped"] == 14 and compiler["requantizes"] is False
    assert result["parity"][0]["cosine"] > 0.97
