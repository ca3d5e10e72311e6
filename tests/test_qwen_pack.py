"""The patched Qwen-v1 fixture as a model: it loads on transformers 5, computes what the original computes
when given the equivalent mask, returns only this step's K/V, and exports without mask-building ops."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from surgery.export.arch import qwen_rope

MASK_OPS = {"Where", "ConstantOfShape", "Equal"}
MASKED = -10000.0  # the additive constant of the block contract (half precision cannot overflow)


def load(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def models(qwen_original: Path, qwen_patched: Path):
    return load(qwen_original), load(qwen_patched)


def prompt(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(7))


def causal_mask(s: int) -> torch.Tensor:
    return torch.full((s, s), MASKED).triu(1)[None, None]


def rotary_kwargs(block: torch.nn.Module, rotary: list[torch.Tensor]) -> dict[str, object]:
    """2023-09 blocks (and 2023-08's once patched) take one `rotary_pos_emb` [cos, sin] pair; later revisions a
    per-sample list; an unpatched 2023-08 block takes none (each attention computes its own)."""
    params = inspect.signature(block.forward).parameters
    if "rotary_pos_emb_list" in params:
        return {"rotary_pos_emb_list": [rotary]}
    return {"rotary_pos_emb": rotary} if "rotary_pos_emb" in params else {}


def rotary_table(model: torch.nn.Module, n: int) -> list[torch.Tensor]:
    """[cos, sin], each [1, n, 1, D], from the model's own rotary module (the export reads the same)."""
    return [x[None, :, None] for x in qwen_rope(model, n)]


def run_blocks(model, ids: torch.Tensor, mask: torch.Tensor, past=None):
    """Embedding -> every block (with the given additive mask) -> ln_f -> lm_head; also each block's K/V."""
    t = model.transformer
    total = ids.shape[1] + (0 if past is None else past[0][0].shape[1])
    rotary = rotary_table(model, total)
    hidden, presents = t.wte(ids), []
    for i, block in enumerate(t.h):
        out = block(hidden, **rotary_kwargs(block, rotary), layer_past=None if past is None else past[i],
                    attention_mask=mask, use_cache=True)
        hidden = out[0]
        presents.append(out[1])
    return model.lm_head(t.ln_f(hidden)), presents


@torch.no_grad()
def test_patched_prefill_matches_original(models):
    original, patched = models
    ids = prompt()
    want = original(ids, use_cache=False).logits
    got, _ = run_blocks(patched, ids, causal_mask(ids.shape[1]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the patched model really relies on the mask input: without it the result changes
    unmasked, _ = run_blocks(patched, ids, torch.zeros(1, 1, 12, 12))
    assert (unmasked - want).abs().max() > 1e-2


@torch.no_grad()
def test_decode_step_returns_only_new_kv_and_matches(models):
    original, patched = models
    ids = prompt(13)
    history = ids[:, :-1]
    _, presents = run_blocks(patched, history, causal_mask(12))
    cfg = patched.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert presents[0][0].shape == (1, 12, cfg.num_attention_heads, head_dim)
    logits, new_kv = run_blocks(patched, ids[:, -1:], torch.zeros(1, 1, 1, 13), past=presents)
    for k, v in new_kv:
        assert k.shape == v.shape == (1, 1, cfg.num_attention_heads, head_dim)
    want = original(ids, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)


def graph_ops(model, s: int = 8) -> set[str]:
    """Export block 0 (prefill, static shapes) with the TorchScript exporter and list its op types."""
    block = model.transformer.h[0]
    builtin_mask = getattr(model.transformer, "registered_causal_mask", None)  # the original's own mask
    rotary = rotary_table(model, s)
    mask_kwargs = ({"registered_causal_mask": builtin_mask}
                   if "registered_causal_mask" in inspect.signature(block.forward).parameters else {})

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, hidden, mask):
            out = self.block(hidden, **rotary_kwargs(block, rotary), **mask_kwargs,
                             attention_mask=mask, use_cache=True)
            return out[0], out[1][0], out[1][1]

    buf = io.BytesIO()
    torch.onnx.export(Prefill().eval(), (torch.randn(1, s, model.config.hidden_size), causal_mask(s)), buf,
                      input_names=["input_states", "attention_mask"], opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue()).graph
    for value in [*graph.input, *graph.output]:
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), "dynamic dim in graph"
    return {node.op_type for node in graph.node}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_has_no_mask_building_ops(models):
    original, patched = models
    assert graph_ops(patched) & MASK_OPS == set()
    assert graph_ops(original) & MASK_OPS
