"""GPTQ act-order linears exported with their input channels sorted by group (export/act_order.py): the
compilers' contiguous groups are then the checkpoint's groups, so their min/max re-quantization gives back
the checkpoint's codes, while the exported graphs compute the same function."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from surgery.apply import plan_apply, write_plan
from surgery.export.act_order import RegroupedIndex, dequantized, plan
from surgery.export.checkpoint import open_checkpoint
from surgery.export.dequant import unpack_rows
from surgery.export.exporter import ExportOptions, export_model
from surgery.fixtures.quantized import QuantSpec, build_quantized
from surgery.packs import ApplyOptions, get_pack
from surgery.requantize import requantize

GROUP = 32


@pytest.fixture(scope="module")
def actorder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quantized(tmp_path_factory.mktemp("actorder") / "m", QuantSpec(desc_act=True, sym=False))


def _index(model: Path):
    return open_checkpoint(model, json.loads((model / "config.json").read_text()))


def tpu_mlir_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TPU-MLIR's W4 per-group quantization (lib/Dialect/Tpu/Transforms/.../A16MatMul: computePerGroupParam,
    weightQuantization) of `weight` [N, K]: per group of `group` consecutive inputs, scale (max - min) / 15
    from the raw min and max, zp = clamp(-round(min / scale), 0, 15), code = clamp(round(w / scale) + zp)."""
    n, k = weight.shape
    w = weight.double().reshape(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / 15
    zp = torch.clamp(-torch.round(low / scale), 0, 15)
    return torch.clamp(torch.round(w / scale) + zp, 0, 15).reshape(n, k), zp, scale


def test_columns_sorted_by_group_and_down_proj_fed_by_permuted_rows(actorder: Path):
    index = _index(actorder)
    regroup = plan(index)
    inner = dequantized(index)
    assert set(regroup.columns) == set(inner.modules) and len(inner.modules) == 14
    for module, perm in regroup.columns.items():
        g_idx = inner.base.read([f"{module}.g_idx"])[f"{module}.g_idx"].long()
        assert not torch.equal(g_idx, torch.arange(len(g_idx)) // GROUP)  # scattered in the checkpoint
        assert torch.equal(g_idx[perm], torch.arange(len(g_idx)) // GROUP)  # consecutive once sorted
    for layer in range(2):
        mlp = f"model.layers.{layer}.mlp"
        assert f"{mlp}.down_proj" not in regroup.gather  # its input comes out of gate/up already in order
        for sibling in ("gate_proj", "up_proj"):
            assert torch.equal(regroup.rows[f"{mlp}.{sibling}"], regroup.columns[f"{mlp}.down_proj"])
    assert not plan(_index(build_quantized(actorder.parent / "plain", QuantSpec(sym=False))))  # no act-order


def test_compiler_groups_give_back_the_checkpoint_codes(actorder: Path):
    """On the regrouped weights, TPU-MLIR's quantization reproduces the checkpoint's codes in every group
    whose codes span 0..15 (RTN-packed fixture groups all but a few); on the scattered ones it does not."""
    index = _index(actorder)
    regroup = plan(index)
    regrouped, inner = RegroupedIndex(index, regroup), dequantized(index)
    spanning = total = 0
    for module, perm in regroup.columns.items():
        name = f"{module}.weight"
        weight, original = regrouped.read([name])[name], index.read([name])[name]
        assert torch.equal(weight, original[:, perm][regroup.rows[module]] if module in regroup.rows
                           else original[:, perm])
        t = inner.base.read([f"{module}.qweight", f"{module}.qzeros"])
        codes = unpack_rows(t[f"{module}.qweight"], 4)[perm].t()  # [N, K], regrouped
        if module in regroup.rows:
            codes = codes[regroup.rows[module]]
        got, _, _ = tpu_mlir_codes(weight, GROUP)
        groups = codes.reshape(len(codes), -1, GROUP)
        span = (groups.amin(-1) == 0) & (groups.amax(-1) == 15)
        same = (got.reshape(groups.shape) == groups).all(-1)
        assert bool(same[span].all()), module
        spanning, total = spanning + int(span.sum()), total + span.numel()
        cosine = torch.nn.functional.cosine_similarity
        assert cosine(requantize(weight, 4, GROUP, False).flatten(), weight.flatten(), 0) > 0.99995
        assert cosine(requantize(original, 4, GROUP, False).flatten(), original.flatten(), 0) < 0.999
    assert spanning > 0.99 * total


def test_exported_block_gathers_only_where_no_producer_can_be_permuted(actorder: Path, tmp_path: Path):
    """q/k/v, o_proj, gate/up read their input through one constant Gather each; down_proj reads gate/up's
    permuted outputs directly; every MatMul weight is the regrouped one."""
    write_plan(plan_apply(get_pack("qwen2"), actorder, ApplyOptions(seq_length=32, dtype="fp32")), tmp_path / "p")
    export_model(tmp_path / "p", tmp_path / "onnx", ExportOptions(seq_length=32, trust_remote_code=True, blocks=[0]))
    graph = onnx.load(str(tmp_path / "onnx" / "block_0.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    regrouped = RegroupedIndex(_index(actorder), plan(_index(actorder)))
    fed = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            module = "model.layers.0." + node.input[1].removeprefix("block.").removesuffix(".weight.T")
            fed[module.rsplit(".", 1)[-1]] = producers[node.input[0]].op_type
            want = regrouped.read([f"{module}.weight"])[f"{module}.weight"].t().numpy()
            assert (weights[node.input[1]] == want).all(), module
    assert fed == {"q_proj": "Gather", "k_proj": "Gather", "v_proj": "Gather", "o_proj": "Gather",
                   "gate_proj": "Gather", "up_proj": "Gather", "down_proj": "Mul"}


def test_gptq_fixture_codes_beat_round_to_nearest_and_leave_groups_short_of_the_extremes():
    """fixtures/gptq.py runs GPTQ proper: on its calibration inputs its output error is below round-to-nearest's
    with the same groups, and (unlike RTN) many groups never use code 0 or 15, where TPU-MLIR's min/max grid
    cannot be the checkpoint's."""
    from surgery.fixtures.gptq import calibration, gptq
    from surgery.fixtures.quantized import quantize_groups

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=gen, dtype=torch.float64) * 0.02, calibration(128, 512, gen)
    codes, zeros, scales, g_idx = gptq(w, x, GROUP)
    g = g_idx.long()
    dequant = ((codes.double() - zeros.double()[g]) * scales.double()[g]).t()
    rtn_codes, rtn_zeros, rtn_scales = quantize_groups(w.float(), g, 128 // GROUP, 4, sym=False)
    rtn = ((rtn_codes.double() - rtn_zeros.double()[g]) * rtn_scales.double()[g]).t()
    assert torch.linalg.norm(x @ (w - dequant).t()) < 0.95 * torch.linalg.norm(x @ (w - rtn).t())  # measured 0.90
    assert not torch.equal(g, torch.arange(128) // GROUP)  # act-order
    per_group = codes.t()[:, torch.argsort(g, stable=True)].reshape(64, -1, GROUP)
    short = ~((per_group.amin(-1) == 0) & (per_group.amax(-1) == 15))
    assert 0.02 < float(short.float().mean()) < 0.5
