"""LoRA adapters merged at export: merged weights equal W + (B @ A) * scale (written out here) and PEFT's
merge_and_unload; exported graphs generate what the merged model generates; bad adapters are refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from surgery.apply import plan_apply, write_plan
from surgery.errors import SurgeryError
from surgery.export.checkpoint import attach_lora, check_lora, open_checkpoint
from surgery.export.exporter import ExportOptions, export_model
from surgery.fixtures.lora import TARGETS, build_lora
from surgery.fixtures.native import build_native
from surgery.packs import ApplyOptions, get_pack
from surgery.runtime import OnnxModel

SEQ = 32


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_native("qwen2", tmp_path_factory.mktemp("lora") / "base")


def with_adapter(base: Path, adapter: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(base, dst)
    attach_lora(dst, adapter)
    return dst, json.loads((dst / "config.json").read_text())


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weights_are_w_plus_scaled_b_a(base: Path, tmp_path: Path, rslora: bool):
    adapter = build_lora(base, tmp_path / "adapter", r=4, alpha=8, rslora=rslora)
    model, config = with_adapter(base, adapter, tmp_path / "model")
    index, weights, lora = open_checkpoint(model, config), load_file(str(base / "model.safetensors")), \
        load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / (math.sqrt(4) if rslora else 4)
    adapted = [k for k in weights if k.endswith(".weight") and k.split(".")[-2] in TARGETS]
    assert len(adapted) == 2 * len(TARGETS)
    for key in adapted:
        module = f"base_model.model.{key[: -len('.weight')]}"
        want = weights[key] + (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]) * scale
        torch.testing.assert_close(index.read([key])[key], want, rtol=0, atol=1e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(index.read([untouched])[untouched], weights[untouched])


def test_alpha_pattern_overrides_one_module(base: Path, tmp_path: Path):
    adapter = build_lora(base, tmp_path / "adapter", r=4, alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"alpha_pattern": {"down_proj": 2}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model, cfg = with_adapter(base, adapter, tmp_path / "model")
    index, weights, lora = open_checkpoint(model, cfg), load_file(str(base / "model.safetensors")), \
        load_file(str(adapter / "adapter_model.safetensors"))
    for key, scale in (("model.layers.1.mlp.down_proj.weight", 2 / 4), ("model.layers.1.self_attn.q_proj.weight", 2)):
        module = f"base_model.model.{key[: -len('.weight')]}"
        want = weights[key] + (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]) * scale
        torch.testing.assert_close(index.read([key])[key], want, rtol=0, atol=1e-6)


def test_merge_equals_peft_merge_and_unload(base: Path, tmp_path: Path):
    peft = pytest.importorskip("peft", reason="peft not installed (the test extra installs it)")
    adapter = build_lora(base, tmp_path / "adapter", rslora=True)
    model, config = with_adapter(base, adapter, tmp_path / "model")
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                            adapter).merge_and_unload().state_dict()
    index = open_checkpoint(model, config)
    for key in (k for k in load_file(str(base / "model.safetensors")) if k.endswith("proj.weight")):
        torch.testing.assert_close(index.read([key])[key], merged[key], rtol=0, atol=1e-6)


@torch.no_grad()
def test_exported_tokens_equal_merged_model(base: Path, tmp_path: Path):
    adapter = build_lora(base, tmp_path / "adapter", rslora=True)
    src, _ = with_adapter(base, adapter, tmp_path / "src")
    write_plan(plan_apply(get_pack("qwen2"), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), tmp_path / "patched")
    assert (tmp_path / "patched" / "lora" / "adapter_model.safetensors").is_file()  # apply carries the adapter
    export_model(tmp_path / "patched", tmp_path / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    net = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # merged by the test's math
    lora, scale = load_file(str(adapter / "adapter_model.safetensors")), 8 / math.sqrt(4)
    for name, param in net.named_parameters():
        module = f"base_model.model.{name[: -len('.weight')]}"
        if f"{module}.lora_A.weight" in lora:
            param += (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]) * scale
    prompt = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(7)).tolist()
    want = greedy(net, prompt, 12)
    assert want != greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), prompt, 12)
    assert OnnxModel(tmp_path / "onnx").generate(prompt, 12).tokens == want
    try:
        import peft
    except ImportError:  # the test extra installs it; without it the test's own merge is the reference
        return
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                            adapter).merge_and_unload().eval()
    assert greedy(merged, prompt, 12) == want  # PEFT's merged model generates the same tokens


def greedy(net: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, net(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("edit,message", [
    ({"use_dora": True}, "use_dora true is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save \\['lm_head'\\] is not supported"),
    ({"bias": "all"}, "bias 'all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
])
def test_unmergeable_adapters_are_refused(base: Path, tmp_path: Path, edit: dict, message: str):
    adapter = build_lora(base, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text()) | edit
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SurgeryError, match=message) as caught:
        check_lora(adapter, "merged")
    assert "adapter_config.json" in str(caught.value) and "\n" not in str(caught.value)


def test_adapter_for_another_model_is_refused(base: Path, tmp_path: Path):
    adapter = build_lora(base, tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    model, config = with_adapter(base, adapter, tmp_path / "model")
    with pytest.raises(SurgeryError, match="targets model.layers.7.mlp.down_proj, which the model has no weight"):
        open_checkpoint(model, config)


def test_bad_mode_and_missing_files_are_refused(base: Path, tmp_path: Path):
    adapter = build_lora(base, tmp_path / "adapter")
    assert check_lora(adapter, "separate") == check_lora(adapter, "merged")  # the target judges separate
    with pytest.raises(SurgeryError, match="--lora-mode 'apart': choose merged or separate"):
        check_lora(adapter, "apart")
    with pytest.raises(SurgeryError, match="must hold adapter_config.json and adapter_model.safetensors"):
        check_lora(tmp_path, "merged")


def test_apply_cli_links_the_adapter(base: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    adapter = build_lora(base, tmp_path / "adapter")
    surgery, env = str(Path(sys.executable).with_name("surgery")), {**os.environ, "COLUMNS": "300"}
    done = subprocess.run([surgery, "apply", "qwen2", "-m", str(base), "-o", str(tmp_path / "out"), "-s", "32",
                           "--lora", str(adapter)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "lora" / "adapter_model.safetensors").resolve() == \
        (adapter / "adapter_model.safetensors").resolve()
    bad = subprocess.run([surgery, "apply", "qwen2", "-m", str(base), "-o", str(tmp_path / "out2"), "--lora",
                          str(tmp_path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "must hold adapter_config.json" in bad.stderr and not (tmp_path / "out2").exists()
