"""A GPTQ or AWQ checkpoint exports to graphs that generate exactly what transformers generates with the
checkpoint's dequantized weights (a float model holding the reference dequantization, quant_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_reference import dequantized_state
from transformers import AutoConfig, AutoModelForCausalLM

from surgery.apply import plan_apply, write_plan
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.fixtures.quantized import QuantSpec, build_quantized
from surgery.packs import ApplyOptions, get_pack
from surgery.runtime import OnnxModel

SEQ, NEW = 32, 12
SPECS = {"gptq-actorder-asym": (QuantSpec(desc_act=True, sym=False), "qwen2"),
         "awq": (QuantSpec(method="awq", sym=False, packing="gemm"), "qwen2"),
         "gptq-head-untied": (QuantSpec(head=True), "qwen3")}  # the head streams as a table, dequantized


@torch.no_grad()
def reference_greedy(model: Path, prompt: list[int], steps: int) -> list[int]:
    """transformers' float model of the same config, its Linears holding the reference dequantization."""
    fields = {k: v for k, v in json.loads((model / "config.json").read_text()).items() if k != "quantization_config"}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = net.load_state_dict(dequantized_state(model), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied head
    net.tie_weights()
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, net(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(SPECS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    spec, family = SPECS[request.param]
    src = build_quantized(root / "src", spec, family=family)
    write_plan(plan_apply(get_pack(family), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    return src, root / "onnx"


def test_tokens_equal_dequantized_checkpoint_in_transformers(exported: tuple[Path, Path]):
    src, onnx_dir = exported
    prompt = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    want = reference_greedy(src, prompt, NEW)
    assert len(set(want)) >= 4, "fixture too degenerate for a token test"
    assert OnnxModel(onnx_dir).generate(prompt, NEW).tokens == want


def test_graphs_match_the_dequantized_torch_model(exported: tuple[Path, Path]):
    rows = verify_export(exported[1], trust_remote_code=True)
    assert rows and min(r.cosine for r in rows) > 0.99999
