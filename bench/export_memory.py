"""Peak RSS and wall time of `surgery export` (weights streamed per block) versus the naive path (load the
whole model, then export each block), side by side in one run, on a random-weight model shaped like
Qwen-1_8B-Chat by default. Each path runs in its own process so their peaks do not mix.

    .venv/bin/python bench/export_memory.py                 # hidden 2048, 24 layers, vocab 151936
    .venv/bin/python bench/export_memory.py --layers 4      # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from surgery.apply import plan_apply, write_plan
from surgery.export.arch import spec_for
from surgery.export.exporter import ExportOptions, export_job, export_model, load_full, plan_jobs
from surgery.fixtures.qwen_v1 import TinyQwenConfig, build
from surgery.packs import ApplyOptions, get_pack


def child(path: str, model: Path, out: Path, seq: int) -> None:
    options = ExportOptions(seq_length=seq, trust_remote_code=True)
    start = time.perf_counter()
    if path == "surgery":
        export_model(model, out, options)
    else:
        full, config = load_full(model, options)
        out.mkdir(parents=True, exist_ok=True)
        for job in plan_jobs(full, spec_for(config["model_type"]), options):
            export_job(job, out / f"{job.name}.onnx", options.opset)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"path": path, "seconds": seconds, "peak_rss_mb": peak_mb}))


def prepare(work: Path, args: argparse.Namespace) -> Path:
    cfg = TinyQwenConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128, kv_channels=128,
                         intermediate_size=args.intermediate * 2, seq_length=8192, max_position_embeddings=8192,
                         initializer_range=0.02)
    tag = f"h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}"
    src, patched = work / f"src-{tag}", work / f"patched-{tag}-s{args.seq_length}"
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        print(f"building random weights ({tag}, bf16, sharded) in {src} ...", flush=True)
        build(src, cfg=cfg, dtype=torch.bfloat16, sharded=True)
    if not (patched / "surgery.json").is_file():
        write_plan(plan_apply(get_pack("qwen"), src, ApplyOptions(seq_length=args.seq_length, dtype="fp32")),
                   patched, force=True)
    return patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=5504, help="MLP width (Qwen's config says twice this)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("build/bench-export-memory"))
    parser.add_argument("--child", choices=["surgery", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.seq_length)
        return
    model = prepare(args.work, args)
    results = {}
    for path in ("surgery", "naive"):
        out = args.work / f"onnx-{path}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"exporting with the {path} path ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", path, "--model", str(model), "--out", str(out),
                               "--seq-length", str(args.seq_length)], check=True, capture_output=True, text=True)
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
    ours, naive = results["surgery"], results["naive"]
    print(f"\n{'path':<10}{'peak RSS MB':>14}{'wall s':>10}")
    for r in (ours, naive):
        print(f"{r['path']:<10}{r['peak_rss_mb']:>14.0f}{r['seconds']:>10.1f}")
    print(f"\npeak RSS ratio surgery/naive: {ours['peak_rss_mb'] / naive['peak_rss_mb']:.2f} (target <= 0.30)")
    print(f"wall time ratio surgery/naive: {ours['seconds'] / naive['seconds']:.2f} (target <= 1.00)")


if __name__ == "__main__":
    main()
