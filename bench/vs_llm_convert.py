"""`surgery convert` versus TPU-MLIR's own `llm_convert` on the same tiny Qwen2 checkpoint (bf16, as
llm_convert requires) and the same quantization, side by side: wall time, bmodel size, and a prefill run
through each bmodel's nets on the CPU simulator (embedding -> blocks -> head) compared with transformers:
cosine of the last hidden state and the greedy next token (llm_convert's lm_head fuses the argmax, so its
logits are not exposed; ours are compared too).

    .venv/bin/python bench/vs_llm_convert.py [--seq-length 64] [--quantize w4bf16] [--group 32]
Needs `surgery toolchain install sophgo` and GNU parallel (Debian package `parallel`) for llm_convert.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from surgery.compile.toolchains import bin_env, installed
from surgery.fixtures.native import build_native

SURGERY = str(Path(sys.executable).with_name("surgery"))


def timed(args: list[str], **kwargs) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise SystemExit(f"{args[0]} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - start


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
    """The first output of one net on the simulator."""
    np.savez(work / "in.npz", **feeds)
    subprocess.run(["model_runner", "--input", str(work / "in.npz"), "--model", str(net), "--output",
                    str(work / "out.npz")], env=bin_env("sophgo"), check=True, capture_output=True)
    out = np.load(work / "out.npz")
    return out[out.files[0]]


def prefill(nets: dict[str, Path], ids: list[int], seq: int, layers: int, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """embedding -> every block on the simulator; the last prompt position's hidden state and the head output."""
    n = len(ids)
    padded = np.zeros((1, seq), np.int32)
    padded[0, :n] = ids
    positions = np.zeros((1, seq), np.int32)
    positions[0, :n] = np.arange(n)
    rows = np.arange(seq)
    mask = np.where((rows[None, :] <= rows[:, None]) & (rows[:, None] < n), 0.0, -10000.0)[None, None]
    hidden = simulate(nets["embedding"], {"input_ids": padded}, work)
    for i in range(layers):
        hidden = simulate(nets[f"block_{i}"], {"input_states": hidden.astype(np.float32), "position_ids": positions,
                                               "attention_mask": mask.astype(np.float32)}, work)
    last = hidden[:, n - 1].astype(np.float32)
    return last, simulate(nets["lm_head"], {"hidden_states": last}, work)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--quantize", default="w4bf16")
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--chip", default="bm1684x")
    args = parser.parse_args()
    if installed("sophgo") is None or shutil.which("parallel") is None:
        raise SystemExit("needs `surgery toolchain install sophgo` and GNU parallel (apt-get install parallel)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_native("qwen2", root / "model" / "qwen2", initializer_range=0.02)
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(torch.bfloat16).save_pretrained(model)
        flags = ["-s", str(args.seq_length), "-q", args.quantize, "-g", str(args.group), "-c", args.chip]
        cold = {**os.environ, "SURGERY_CACHE": str(root / "cache")}  # no compiled graph reused from earlier runs
        ours_s = timed([SURGERY, "convert", "qwen2", "-m", str(model), *flags, "-o", str(root / "ours"), "--json"],
                       env=cold)
        work = root / "llm_convert_work"
        work.mkdir()
        theirs_s = timed(["llm_convert", "-m", str(model), *flags, "-o", str(root / "theirs")], cwd=work,
                         env=bin_env("sophgo"))
        ours_bmodel, theirs_bmodel = next((root / "ours").glob("*.bmodel")), next((root / "theirs").glob("*.bmodel"))
        ours_size, theirs_size = ours_bmodel.stat().st_size, theirs_bmodel.stat().st_size
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        prompt = [5, 17, 42, 7, 99, 3, 250, 11]
        captured = {}
        reference.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(h=o[0] if isinstance(
            o, tuple) else o))
        with torch.no_grad():
            logits = reference(torch.tensor([prompt])).logits[0, -1].numpy()
        want_hidden, want_token = captured["h"][0, -1].numpy(), int(logits.argmax())
        layers = reference.config.num_hidden_layers
        accuracy = {}
        for label, bmodel in (("surgery", ours_bmodel), ("llm_convert", theirs_bmodel)):
            work_dir = root / f"sim-{label}"
            hidden, head = prefill(nets_by_name(bmodel, work_dir), prompt, args.seq_length, layers, work_dir)
            token = int(head.reshape(-1)[0]) if head.size == 1 else int(head.reshape(-1).argmax())
            accuracy[label] = (cosine(hidden, want_hidden), token == want_token,
                               cosine(head, logits) if head.size == logits.size else None)
        parity = json.loads((root / "ours" / "manifest.json").read_text())["compiled"]["parity"]
    worst = {}
    for row in parity:
        if row["output"] in ("hidden_states", "m_logits"):
            worst[row["graph"]] = min(row["cosine"], worst.get(row["graph"], 1.0))
    print(f"tiny Qwen2 (bf16), {args.quantize} g{args.group}, seq {args.seq_length}, {args.chip}\n")
    print(f"{'':<14}{'wall s':>9}{'bmodel bytes':>15}")
    print(f"{'surgery':<14}{ours_s:>9.1f}{ours_size:>15,}")
    print(f"{'llm_convert':<14}{theirs_s:>9.1f}{theirs_size:>15,}")
    print(f"\nratio surgery/llm_convert: wall {ours_s / theirs_s:.2f}x, size {ours_size / theirs_size:.2f}x")
    print("\nprefill of 8 tokens on the simulator vs transformers (fp32):")
    for label, (hidden_cos, same_token, logits_cos) in accuracy.items():
        logits_text = "not exposed (argmax fused)" if logits_cos is None else f"{logits_cos:.5f}"
        print(f"  {label:<12} last hidden cosine {hidden_cos:.5f}, next token {'same' if same_token else 'DIFFERENT'}, "
              f"logits cosine {logits_text}")
    print("surgery's wall time includes exporting, optimizing, checking every graph on the simulator and the "
          "report; llm_convert writes MLIR straight from the weights and checks nothing.")
    print("surgery simulator cosine vs onnxruntime: " + ", ".join(f"{g} {c:.5f}" for g, c in worst.items()))


if __name__ == "__main__":
    main()
