"""`surgery convert -c mnn` versus MNN's own `llmexport` on the same tiny Qwen2, side by side in one run:
wall time, peak RSS, output size, and whether each generates transformers' greedy tokens.

    .venv/bin/python bench/vs_llmexport.py [--bits 8] [--tokens 16]
Needs `surgery toolchain install mnn`; creates build/bench-llmexport/env (torch 2.13.0 + llmexport) once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from surgery.fixtures.native import build_native
from surgery.runtime import open_runtime

SURGERY = str(Path(sys.executable).with_name("surgery"))
ENV = Path("build/bench-llmexport/env")
MEASURE = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
           "'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'tail': r.stderr[-2000:]}))")
# greedy through MNN's LLM runtime: forward() returns the next-token logits and keeps the KV cache
GREEDY = """
import json, sys
import numpy as np
import MNN.llm as llm
model = llm.create(sys.argv[1])
model.set_config(json.dumps({"sampler_type": "greedy"}))
model.load()
ids, out = json.loads(sys.argv[2]), []
logits = model.forward(ids)
for _ in range(int(sys.argv[3])):
    out.append(int(np.array(logits.read()).reshape(-1).argmax()))
    logits = model.forward([out[-1]])
print(json.dumps(out))
"""


def measured(args: list[str]) -> dict:
    """Run `args` in a fresh process; its wall time and the peak RSS of the largest process it ran."""
    result = json.loads(subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True,
                                       check=True).stdout)
    if result["rc"]:
        raise SystemExit(f"{args[0]} failed:\n{result['tail']}")
    return result


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=8, choices=[4, 8])
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    if not (ENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        subprocess.run([str(ENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "llmexport"], check=True)
    site = next((ENV / "lib").glob("python*/site-packages"))
    prompt = [5, 17, 42, 7, 99, 3]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_native("qwen2", root / "qwen2")
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).generate(
            torch.tensor([prompt]), max_new_tokens=args.tokens, do_sample=False)[0, len(prompt):].tolist()
        ours = measured([SURGERY, "convert", "qwen2", "-m", str(model), "-s", "64", "-q", f"w{args.bits}bf16",
                         "-g", "32", "-c", "mnn", "-o", str(root / "ours")])
        ours_size = size(root / "ours") - size(root / "ours" / "stages")
        ours_tokens = open_runtime(root / "ours").generate(prompt, args.tokens).tokens
        theirs = measured(["env", f"PYTHONPATH={site / 'llmexport'}", str(ENV / "bin" / "python"), "-m", "llmexport",
                           "--path", str(model), "--export", "mnn", "--quant_bit", str(args.bits), "--quant_block",
                           "32", "--dst_path", str(root / "theirs")])
        theirs_size = size(root / "theirs")
        theirs_tokens = json.loads(subprocess.run(
            [str(ENV / "bin" / "python"), "-c", GREEDY, str(root / "theirs" / "config.json"), json.dumps(prompt),
             str(args.tokens)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    def agree(tokens: list[int]) -> str:
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(reference))
        return "all" if same == len(reference) else f"first {same}"

    print(f"tiny Qwen2 (init 0.2, GQA, tied), {args.bits}-bit weights block 32, {args.tokens} greedy tokens\n")
    print(f"{'':<18}{'wall s':>8}{'peak RSS MB':>13}{'bytes':>12}  tokens equal to transformers generate()")
    print(f"{'surgery convert':<18}{ours['seconds']:>8.1f}{ours['peak_mb']:>13.0f}{ours_size:>12,}  "
          f"{agree(ours_tokens)}")
    print(f"{'llmexport':<18}{theirs['seconds']:>8.1f}{theirs['peak_mb']:>13.0f}{theirs_size:>12,}  "
          f"{agree(theirs_tokens)}")
    print(f"\nratios surgery/llmexport: wall {ours['seconds'] / theirs['seconds']:.2f}x, "
          f"peak RSS {ours['peak_mb'] / theirs['peak_mb']:.2f}x, size {ours_size / theirs_size:.2f}x")
    print("surgery's time includes checking every graph against onnxruntime on MNN and the report; llmexport's "
          "MNN runtime computes in low precision (its default config).")


if __name__ == "__main__":
    main()
