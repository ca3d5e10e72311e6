"""`surgery convert -c mnn` versus MNN's own `llmexport`, side by side in one run, on the same checkpoint
(Qwen2-0.5B's shape with 4 layers by default: vocabulary 151936, hidden 896, tied embeddings) and the same
weight bits: wall time, peak RSS of each process tree, output size, and (tiny shape only, where tokens are
meaningful) whether each generates transformers' greedy tokens.

    .venv/bin/python bench/vs_llmexport.py                          # qwen2-0_5b shape, 4 layers, 4-bit block 64
    .venv/bin/python bench/vs_llmexport.py --shape tiny --bits 8 --block 32
Needs `surgery toolchain install mnn`; creates build/bench-llmexport/env (torch 2.13.0 + llmexport) once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from treerss import measure, write_json

from surgery.fixtures.native import build_native
from surgery.fixtures.shapes import build_shaped

SURGERY = str(Path(sys.executable).with_name("surgery"))
GREEDY = """
import json, os, sys
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
print(json.dumps(out), flush=True)
os._exit(0)  # MNN.llm's objects crash the interpreter's teardown, after the work is done
"""


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_model(root: Path, shape: str, layers: int) -> Path:
    path = root / f"model-{shape}-l{layers}"
    if (path / "config.json").is_file():
        return path
    if shape == "tiny":
        return build_native("qwen2", path, num_hidden_layers=layers)
    return build_shaped(shape, path, layers=layers, sharded=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0_5b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("build/bench-llmexport"))
    parser.add_argument("--json", type=Path, help="Also write the figures here (bench/readme_tables.py reads it).")
    args = parser.parse_args()
    root = args.work.absolute()
    env = root / "env"
    if not (env / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", "torch==2.13.0", "llmexport"], check=True)
    site = next((env / "lib").glob("python*/site-packages"))
    model = build_model(root, args.shape, args.layers)
    rows = {}
    for check in ("none", "sample"):
        out = root / f"surgery-{check}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"running surgery convert --check {check} ...", flush=True)
        m = measure([SURGERY, "convert", "auto", "-m", str(model), "-s", str(args.seq_length), "-q",
                     f"w{args.bits}bf16", "-g", str(args.block), "-c", "mnn", "-o", str(out), "--check", check,
                     "--json"], log=root / f"surgery-{check}.log")
        if m.returncode:
            raise SystemExit(f"surgery convert failed; see {root / f'surgery-{check}.log'}")
        rows[f"surgery (check {check})"] = (m, size(out) - size(out / "stages"), out)
    theirs = root / "llmexport"
    shutil.rmtree(theirs, ignore_errors=True)
    print("running llmexport ...", flush=True)
    m = measure(["env", f"PYTHONPATH={site / 'llmexport'}", str(env / "bin" / "python"), "-m", "llmexport", "--path",
                 str(model), "--export", "mnn", "--quant_bit", str(args.bits), "--quant_block", str(args.block),
                 "--dst_path", str(theirs)], log=root / "llmexport.log", env={**os.environ})
    if m.returncode:
        raise SystemExit(f"llmexport failed; see {root / 'llmexport.log'}")
    rows["llmexport"] = (m, size(theirs), theirs)
    print(f"\n{args.shape} x {args.layers} layers, {args.bits}-bit weights block {args.block}, seq "
          f"{args.seq_length}; measured side by side on this machine\n")
    print(f"{'':<24}{'wall s':>9}{'peak tree MB':>14}{'output bytes':>16}")
    for label, (m, nbytes, _) in rows.items():
        print(f"{label:<24}{m.seconds:>9.1f}{m.peak_tree_mb:>14,.0f}{nbytes:>16,}")
    base = rows["llmexport"]
    print("\nratios to llmexport (goal: wall <= 1.0x with checks off, <= 2.0x with default checks; RSS and size "
          "<= 1.0x)")
    for label in [k for k in rows if k != "llmexport"]:
        m, nbytes, _ = rows[label]
        print(f"  {label:<22} wall {m.seconds / base[0].seconds:.2f}x  tree RSS "
              f"{m.peak_tree_mb / base[0].peak_tree_mb:.2f}x  size {nbytes / base[1]:.2f}x")
    if args.json:
        write_json(args.json, {"bench": "vs_llmexport", "shape": args.shape, "layers": args.layers,
                               "seq": args.seq_length, "bits": args.bits, "block": args.block, "base": "llmexport",
                               "rows": {label: {"wall": m.seconds, "tree_mb": m.peak_tree_mb, "bytes": nbytes}
                                        for label, (m, nbytes, _) in rows.items()}})
    if args.shape == "tiny":
        import torch
        from transformers import AutoModelForCausalLM

        from surgery.runtime import open_runtime

        prompt = [5, 17, 42, 7, 99, 3]
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).generate(
            torch.tensor([prompt]), max_new_tokens=args.tokens, do_sample=False)[0, len(prompt):].tolist()
        ours = open_runtime(rows["surgery (check sample)"][2]).generate(prompt, args.tokens).tokens
        mnn_python = Path.home() / ".cache/surgery/toolchains/mnn/bin/python"
        theirs_tokens = json.loads(subprocess.run([str(mnn_python), "-c", GREEDY, str(theirs / "config.json"),
                                                   json.dumps(prompt), str(args.tokens)], capture_output=True,
                                                  text=True, check=True).stdout.strip().splitlines()[-1])
        for label, tokens in (("surgery", ours), ("llmexport", theirs_tokens)):
            same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(reference))
            print(f"  {label}: greedy tokens equal to transformers' for the first {same} of {len(reference)}")


if __name__ == "__main__":
    main()
