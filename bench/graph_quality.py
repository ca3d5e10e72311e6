"""Node counts of each fixture's decode block (raw export, onnxslim alone, `surgery optimize --target
generic`) and onnxruntime CPU time of one full decode step (every decode block) raw vs ours, side by side.

    .venv/bin/python bench/graph_quality.py                    # tiny fixtures (seconds)
    .venv/bin/python bench/graph_quality.py --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from surgery.apply import plan_apply, write_plan
from surgery.contract import random_inputs
from surgery.export.exporter import ExportOptions, export_model
from surgery.fixtures.native import FAMILIES, build_native
from surgery.fixtures.qwen_v1 import TinyQwenConfig, build
from surgery.manifest import Manifest
from surgery.optimize import optimize_dir
from surgery.packs import ApplyOptions, get_pack
from surgery.passes import PASSES


def decode_step_ms(directory: Path, repeats: int) -> float:
    """Median wall time of running every block_cache_i once, on fixed parity inputs."""
    manifest = Manifest.read(directory)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    graphs = [g for g in manifest.graphs if g.kind == "block_cache"]
    sessions = [(ort.InferenceSession(str(directory / g.file), opts, providers=["CPUExecutionProvider"]),
                 random_inputs(g, manifest.vocab_size)) for g in graphs]
    for session, feeds in sessions:
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for session, feeds in sessions:
            session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def prepare(family: str, root: Path, args: argparse.Namespace) -> Path:
    if family == "qwen":
        cfg = TinyQwenConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 16, intermediate_size=args.hidden * 4)
        src = build(root / "src", revision="2023-12", cfg=cfg)
    else:
        src = build_native(family, root / "src", hidden_size=args.hidden, num_hidden_layers=args.layers,
                           intermediate_size=args.hidden * 2, num_attention_heads=args.hidden // 16,
                           num_key_value_heads=args.hidden // 32,
                           **({"head_dim": 16} if family == "qwen3" else {}))
    write_plan(plan_apply(get_pack(family), src, ApplyOptions(seq_length=args.seq_length, dtype="fp32")),
               root / "patched")
    export_model(root / "patched", root / "raw", ExportOptions(seq_length=args.seq_length, trust_remote_code=True))
    shutil.copytree(root / "raw", root / "ours")
    optimize_dir(root / "ours", "generic", keep=False)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ["qwen", *FAMILIES]:
            root = prepare(family, Path(tmp) / family, args)
            raw = onnx.load(str(root / "raw" / "block_cache_0.onnx"))
            slim = PASSES["slim"].fn(raw)[0]
            ours = onnx.load(str(root / "ours" / "block_cache_0.onnx"))
            raw_ms, ours_ms = decode_step_ms(root / "raw", args.repeats), decode_step_ms(root / "ours", args.repeats)
            rows.append((family, len(raw.graph.node), len(slim.graph.node), len(ours.graph.node), raw_ms, ours_ms))
    print(f"decode block nodes and one full decode step on onnxruntime CPU (1 thread), hidden {args.hidden}, "
          f"{args.layers} layers, SEQ {args.seq_length}\n")
    print(f"{'family':<9}{'raw':>6}{'slim':>6}{'ours':>6}{'ours/slim':>11}{'raw ms':>9}{'ours ms':>9}{'speed-up':>10}")
    for family, raw, slim, ours, raw_ms, ours_ms in rows:
        print(f"{family:<9}{raw:>6}{slim:>6}{ours:>6}{ours / slim:>11.2f}{raw_ms:>9.3f}{ours_ms:>9.3f}"
              f"{raw_ms / ours_ms:>9.2f}x")


if __name__ == "__main__":
    main()
