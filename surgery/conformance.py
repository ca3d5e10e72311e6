"""The conformance suite every pack gets for free: apply -> load -> logits parity with the original ->
export -> per-graph onnxruntime parity -> `run` tokens equal to the original model's greedy tokens.

Tests call `check_pack`; a scaffolded pack (`surgery port`) gets a test that does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.apply import plan_apply, write_plan
from surgery.export.arch import ArchSpec
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.manifest import MASK_VALUE
from surgery.packs import ApplyOptions, Pack, get_pack
from surgery.parity import Parity
from surgery.runtime import OnnxModel


@dataclass
class Conformance:
    pack: str
    logits_max_abs: float
    worst: Parity
    tokens: list[int]
    reference: list[int]  # the original's argmax loop
    generated: list[int] | None = None  # the original's generate() (None where transformers 5 cannot run it)
    parity: list[Parity] = field(default_factory=list)

    @property
    def tokens_equal(self) -> bool:
        return self.tokens == self.reference


def load(path: Path, remote: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from surgery.export.source import forget_remote_classes

    forget_remote_classes()  # each revision's own code, though their configuration files are identical
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, dtype=torch.float32).eval()


def original_model(pack: Pack, src: Path, work: Path) -> torch.nn.Module:
    """The unpatched model as transformers runs it (remote-code packs: with only their load fixes)."""
    if not pack.load_only:
        return load(src, remote=False)
    out = work / "original"
    write_plan(plan_apply(pack, src, ApplyOptions(only=pack.load_only)), out, force=True)
    return load(out, remote=True)


@torch.no_grad()
def block_logits(model: torch.nn.Module, spec: ArchSpec, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a patched model through its block contract pieces, with an additive causal mask."""
    s = ids.shape[1]
    cos, sin = spec.rope_tables(model, s)
    hidden = spec.part(model, spec.embedding)(ids)
    if spec.embedding_scale:
        hidden = hidden * spec.embedding_scale(model.config)
    mask = torch.full((s, s), MASK_VALUE).triu(1)[None, None]
    for block in spec.part(model, spec.layers):
        hidden, _, _ = spec.call_block(block, hidden, cos[None], sin[None], mask, None)
    hidden = spec.part(model, spec.final_norm)(hidden)
    if spec.head_divisor:
        hidden = hidden / spec.head_divisor(model.config)
    return spec.part(model, spec.lm_head)(hidden)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Argmax loop with full recompute: no cache, no EOS logic, nothing to disagree about."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def check_pack(pack_name: str, src: Path, work: Path, seq: int = 64, new_tokens: int = 32,
               prompt_len: int = 12, seed: int = 3) -> Conformance:
    pack = get_pack(pack_name)
    work.mkdir(parents=True, exist_ok=True)
    patched_dir = work / "patched"
    write_plan(plan_apply(pack, src, ApplyOptions(seq_length=seq, dtype="fp32")), patched_dir, force=True)
    original = original_model(pack, src, work)
    patched = load(patched_dir, remote=True)
    prompt = torch.randint(0, original.config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    ids = torch.tensor([prompt])
    spec = pack.export_spec
    with torch.no_grad():
        want = original(ids, use_cache=False).logits
    logits_diff = float((block_logits(patched, spec, ids) - want).abs().max())
    del patched
    onnx_dir = work / "onnx"
    export_model(patched_dir, onnx_dir, ExportOptions(seq_length=seq, trust_remote_code=True))
    rows = verify_export(onnx_dir, trust_remote_code=True)
    tokens = OnnxModel(onnx_dir).generate(prompt, new_tokens).tokens
    reference = greedy(original, prompt, new_tokens)
    generated = None
    if not pack.load_only:  # remote-code Qwen-v1 keeps tuple caches, which generate() in transformers 5 rejects
        with torch.no_grad():
            out = original.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
        generated = out[0, len(prompt):].tolist()
    return Conformance(pack_name, logits_diff, min(rows, key=lambda r: r.cosine), tokens, reference, generated,
                       rows)
