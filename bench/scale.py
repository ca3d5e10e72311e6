"""Memory and time of `surgery convert` at real sizes, per stage, and flat in the number of layers.

Builds a Qwen-7B-shaped model from our own Qwen-v1 fixture code (real hidden size 4096, 32 heads x 128,
intermediate 22016, vocabulary 151936; random bf16 weights; 2 and 4 layers) and converts it to the end for
each chip, printing each stage's wall time and peak RSS (the whole process tree, compiler workers included,
as `surgery convert` records it), then the 4-layer/2-layer ratio of every stage's peak.

    .venv/bin/python bench/scale.py                                  # qwen-7b, 2 and 4 layers, bm1684x + mnn
    .venv/bin/python bench/scale.py --shape qwen-1_8b --layers 2 --chips mnn
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from treerss import measure

from surgery.fixtures.shapes import FAMILY_OF_SHAPE, SHAPES, build_shaped

QUANT = {"mnn": "w4bf16"}  # MNN: 4-bit weights (w4*), block = -g


def model_for(work: Path, shape: str, layers: int) -> Path:
    path = work / f"{shape}-l{layers}"
    if not (path / "config.json").is_file():
        print(f"building {shape} with {layers} layers (random bf16 weights) in {path} ...", flush=True)
        build_shaped(shape, path, layers=layers)
    return path


def convert(model: Path, out: Path, chip: str, args: argparse.Namespace) -> dict:
    surgery = str(Path(sys.executable).with_name("surgery"))
    pack = "qwen" if FAMILY_OF_SHAPE[args.shape] == "qwen" else "auto"
    command = [surgery, "convert", pack, "-m", str(model), "-o", str(out), "-s", str(args.seq), "-c", chip,
               "-q", QUANT.get(chip, args.quantize), "-g", str(args.group), "--check", args.check,
               "--trust-remote-code", "--json"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    cache = out.with_name(out.name + ".cache")  # cold: no graph reused from another run (layers share seeds)
    shutil.rmtree(cache, ignore_errors=True)
    measured = measure(command, log=log, env={**os.environ, "SURGERY_CACHE": str(cache)})
    if measured.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"surgery convert failed for {model.name} on {chip} (see {log}):\n{tail}")
    state = json.loads((out / "convert.json").read_text())["stages"]
    figures = {"wall": measured.seconds, "tree_mb": measured.peak_tree_mb, "graphs": graph_seconds(out),
               "stages": {name: {"seconds": s["seconds"], **s.get("peak_mb", {})} for name, s in state.items()}}
    if not args.keep:  # a 7B bundle and its stages are 15-25 GB: keep only the figures
        shutil.rmtree(out / "stages", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return figures


def graph_seconds(out: Path) -> dict[str, dict[str, float]]:
    """Per graph kind, the mean seconds one graph took to build and to simulate (a Sophgo bundle records them):
    what docs/scaling.md multiplies out for bigger models."""
    details = (json.loads((out / "manifest.json").read_text()).get("compiled") or {}).get("details", {})
    kinds: dict[str, dict[str, list[float]]] = {}
    for name in details.get("routes", {}):
        kind = name.rstrip("0123456789").rstrip("_")
        if name in details.get("build_seconds", {}):
            kinds.setdefault(kind, {}).setdefault("build", []).append(sum(details["build_seconds"][name].values()))
        if name in details.get("simulate_seconds", {}):
            kinds.setdefault(kind, {}).setdefault("simulate", []).append(details["simulate_seconds"][name])
    return {kind: {what: sum(v) / len(v) for what, v in times.items()} for kind, times in kinds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--chips", nargs="+", default=["bm1684x", "mnn"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--quantize", default="w4bf16")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--check", default="sample", choices=["none", "sample", "all"])
    parser.add_argument("--work", type=Path, default=Path("build/bench-scale"))
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--keep", action="store_true", help="Keep each bundle's stages (GBs each at 7B).")
    args = parser.parse_args()
    results: dict[str, dict[int, dict]] = {}
    for chip in args.chips:
        for layers in args.layers:
            model = model_for(args.work, args.shape, layers)
            out = args.work / f"out-{args.shape}-l{layers}-{chip}"
            shutil.rmtree(out, ignore_errors=True)
            results.setdefault(chip, {})[layers] = convert(model, out, chip, args)
    print(f"\n{args.shape}, seq {args.seq}, checks: {args.check} (peak RSS of the process tree, MB)")
    print(f"{'chip':8} {'layers':>6} {'stage':9} {'seconds':>8} {'peak MB':>9} {'largest process MB':>19}")
    for chip, by_layers in results.items():
        for layers, r in by_layers.items():
            for stage, s in r["stages"].items():
                print(f"{chip:8} {layers:>6} {stage:9} {s['seconds']:>8.1f} {s.get('tree', 0):>9,.0f} "
                      f"{s.get('process', 0):>19,.0f}")
            print(f"{chip:8} {layers:>6} {'total':9} {r['wall']:>8.1f} {r['tree_mb']:>9,.0f}")
            for kind, t in r["graphs"].items():
                print(f"{chip:8} {layers:>6} one {kind}: " + ", ".join(f"{w} {v:.1f} s" for w, v in t.items()))
    if len(args.layers) > 1:
        lo, hi = min(args.layers), max(args.layers)
        print(f"\npeak ratio {hi} layers / {lo} layers, per stage (flat memory: close to 1.0)")
        for chip, by_layers in results.items():
            ratios = {stage: by_layers[hi]["stages"][stage].get("tree", 0) / max(s.get("tree", 0), 1)
                      for stage, s in by_layers[lo]["stages"].items()}
            print(f"{chip:8} " + "  ".join(f"{stage} {ratio:.2f}x" for stage, ratio in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
