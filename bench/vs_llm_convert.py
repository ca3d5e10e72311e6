"""`surgery convert` versus TPU-MLIR's own `llm_convert` on the same tiny Qwen2 checkpoint (bf16, as
llm_convert requires) and the same quantization, side by side: wall time and bmodel size, plus our
per-graph simulator cosines (llm_convert's lm_head fuses the argmax, so it exposes no logits to compare).

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

import torch

from surgery.compile.toolchains import bin_env, installed
from surgery.fixtures.native import build_native

SURGERY = str(Path(sys.executable).with_name("surgery"))


def timed(args: list[str], **kwargs) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise SystemExit(f"{args[0]} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - start


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
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(torch.bfloat16).save_pretrained(model)
        flags = ["-s", str(args.seq_length), "-q", args.quantize, "-g", str(args.group), "-c", args.chip]
        cold = {**os.environ, "SURGERY_CACHE": str(root / "cache")}  # no compiled graph reused from earlier runs
        ours_s = timed([SURGERY, "convert", "qwen2", "-m", str(model), *flags, "-o", str(root / "ours"), "--json"],
                       env=cold)
        work = root / "llm_convert_work"
        work.mkdir()
        theirs_s = timed(["llm_convert", "-m", str(model), *flags, "-o", str(root / "theirs")], cwd=work,
                         env=bin_env("sophgo"))
        ours_size = next((root / "ours").glob("*.bmodel")).stat().st_size
        theirs_size = next((root / "theirs").glob("*.bmodel")).stat().st_size
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
    print("surgery's wall time includes exporting, optimizing, checking every graph on the simulator and the "
          "report; llm_convert writes MLIR straight from the weights and checks nothing.")
    print("surgery simulator cosine vs onnxruntime: " + ", ".join(f"{g} {c:.5f}" for g, c in worst.items()))


if __name__ == "__main__":
    main()
