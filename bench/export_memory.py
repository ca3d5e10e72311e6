"""Peak RSS of `surgery export` (weights streamed, vocabulary tables written chunk by chunk) against what a
per-model export script needs at least: the model loaded with `from_pretrained` in bf16 and one forward.
Side by side in one run, each in its own process so their peaks do not mix; a random-weight model with
Qwen-1_8B-Chat's shape by default (hidden 2048, 24 layers, vocabulary 151936, bf16 shards).

    .venv/bin/python bench/export_memory.py                    # qwen-1_8b, all 24 layers, seq 512
    .venv/bin/python bench/export_memory.py --layers 4         # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from treerss import measure

from surgery.apply import plan_apply, write_plan
from surgery.fixtures.shapes import build_shaped
from surgery.packs import ApplyOptions, get_pack


def baseline(model: Path) -> None:
    """from_pretrained in bf16 and one forward over 8 tokens: the floor of any whole-model export."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, trust_remote_code=True).eval()
    with torch.no_grad():
        loaded(torch.arange(8)[None])
    print(json.dumps({"seconds": time.perf_counter() - start}))


def prepare(work: Path, shape: str, layers: int, seq: int) -> tuple[Path, Path]:
    src, patched = work / f"{shape}-l{layers}", work / f"{shape}-l{layers}-patched-s{seq}"
    if not (src / "config.json").is_file():
        print(f"building {shape} with {layers} layers (random bf16 weights) in {src} ...", flush=True)
        build_shaped(shape, src, layers=layers)
    if not (patched / "surgery.json").is_file():
        write_plan(plan_apply(get_pack("qwen"), src, ApplyOptions(seq_length=seq, dtype="fp32")), patched,
                   force=True)
    return src, patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen-1_8b")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("build/bench-export-memory"))
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        baseline(args.baseline)
        return
    src, patched = prepare(args.work.absolute(), args.shape, args.layers, args.seq_length)
    out = args.work.absolute() / "onnx"
    shutil.rmtree(out, ignore_errors=True)
    surgery = str(Path(sys.executable).with_name("surgery"))
    print("exporting with surgery ...", flush=True)
    ours = measure([surgery, "export", str(patched), "--out", str(out), "--seq-length", str(args.seq_length),
                    "--trust-remote-code", "--json"], log=args.work / "export.log")
    print("loading with from_pretrained (bf16) + one forward ...", flush=True)
    base = measure([sys.executable, __file__, "--baseline", str(patched)], log=args.work / "baseline.log")
    if ours.returncode or base.returncode:
        raise SystemExit(f"a run failed; see {args.work}/export.log and baseline.log")
    data = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    print(f"\n{args.shape} x {args.layers} layers, seq {args.seq_length} (peak RSS of each process tree)\n")
    print(f"{'':<38}{'peak RSS MB':>12}{'wall s':>9}")
    print(f"{'surgery export (all graphs)':<38}{ours.peak_tree_mb:>12,.0f}{ours.seconds:>9.1f}")
    print(f"{'from_pretrained bf16 + one forward':<38}{base.peak_tree_mb:>12,.0f}{base.seconds:>9.1f}")
    print(f"\nexport peak / from_pretrained peak: {ours.peak_tree_mb / base.peak_tree_mb:.2f}x (goal <= 0.30x); "
          f"export wrote {data / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
