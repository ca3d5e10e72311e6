"""A prefill through a combined bmodel's nets on the CPU simulator (embedding -> every block -> lm_head), the
final hidden state compared with transformers' (after the final norm, which both surgery's and llm_convert's
last blocks apply) and the next token. Used by bench/vs_llm_convert.py --accuracy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from surgery.compile.toolchains import bin_env
from surgery.contract import prefill_mask

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]


def nets_by_name(bmodel: Path, work: Path) -> dict[str, Path]:
    """Split a combined bmodel into one-net bmodels (model_runner runs a file's first net only)."""
    work.mkdir(parents=True, exist_ok=True)
    env = bin_env("sophgo")
    subprocess.run(["model_tool", "--extract", str(bmodel)], cwd=work, env=env, check=True, capture_output=True)
    info = subprocess.run(["model_tool", "--info", str(bmodel)], env=env, check=True, capture_output=True,
                          text=True).stdout
    names = [line.split("[")[1].split("]")[0] for line in info.splitlines() if line.startswith("net ")]
    return {name: work / f"bm_net{i}_stage0.bmodel" for i, name in enumerate(names)}


def simulate(net: Path, feeds: dict[str, np.ndarray], work: Path) -> np.ndarray:
    np.savez(work / "in.npz", **feeds)
    subprocess.run(["model_runner", "--input", str(work / "in.npz"), "--model", str(net), "--output",
                    str(work / "out.npz")], env=bin_env("sophgo"), check=True, capture_output=True)
    out = np.load(work / "out.npz")
    return out[out.files[0]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def compare_prefill(model_dir: Path, bmodel: Path, seq: int, work: Path) -> tuple[float, bool]:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured = {}
    reference.model.norm.register_forward_hook(lambda m, i, o: captured.update(h=o))
    with torch.no_grad():
        logits = reference(torch.tensor([PROMPT])).logits[0, -1].numpy()
    want_hidden, want_token = captured["h"][0, -1].numpy(), int(logits.argmax())
    nets = nets_by_name(bmodel, work)
    n = len(PROMPT)
    ids = np.zeros((1, seq), np.int32)
    ids[0, :n] = PROMPT
    positions = np.zeros((1, seq), np.int32)
    positions[0, :n] = np.arange(n)
    hidden = simulate(nets["embedding"], {"input_ids": ids}, work)
    for i in range(reference.config.num_hidden_layers):
        hidden = simulate(nets[f"block_{i}"], {"input_states": hidden.astype(np.float32), "position_ids": positions,
                                               "attention_mask": prefill_mask(seq, n)}, work)
    last = hidden[:, n - 1].astype(np.float32)
    head = simulate(nets["lm_head"], {"hidden_states": last}, work)
    token = int(head.reshape(-1)[0]) if head.size == 1 else int(head.reshape(-1).argmax())
    return cosine(last, want_hidden), token == want_token
