"""`surgery convert` versus TPU-MLIR's own `llm_convert`, side by side in one run, on the same bf16 checkpoint
(Qwen2-0.5B's shape with 4 layers by default: vocabulary 151936, hidden 896) and the same quantization:
wall time, peak RSS of each tool's whole process tree, bmodel size and device memory (`model_tool --info`),
with surgery's checks off and at their default. `--accuracy` also runs a prefill through each bmodel's nets
on the CPU simulator and compares the final hidden state and next token with transformers.

    .venv/bin/python bench/vs_llm_convert.py                       # qwen2-0_5b shape, 4 layers, seq 256, w4bf16 g64
    .venv/bin/python bench/vs_llm_convert.py --shape tiny --seq-length 64 --group 32 --accuracy
Needs `surgery toolchain install sophgo` and GNU parallel (Debian package `parallel`) for llm_convert.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from treerss import Measured, measure, write_json

from surgery.compile.toolchains import bin_env, installed
from surgery.fixtures.native import build_native
from surgery.fixtures.shapes import build_shaped

SURGERY = str(Path(sys.executable).with_name("surgery"))


def device_weight(bmodel: Path) -> int:
    """Device weight memory of a combined bmodel, as model_tool reports it."""
    info = subprocess.run(["model_tool", "--info", str(bmodel)], env=bin_env("sophgo"), check=True,
                          capture_output=True, text=True).stdout
    return int(re.search(r"device mem size: \d+ \(weight: (\d+)", info).group(1))


def run(label: str, args: list[str], log: Path, **kwargs) -> Measured:
    print(f"running {label} ...", flush=True)
    measured = measure(args, log=log, **kwargs)
    if measured.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{label} failed (see {log}):\n{tail}")
    return measured


def build_model(root: Path, shape: str, layers: int) -> Path:
    path = root / f"model-{shape}-l{layers}"
    if (path / "config.json").is_file():
        return path
    if shape == "tiny":
        import torch
        from transformers import AutoModelForCausalLM

        build_native("qwen2", path, initializer_range=0.02, num_hidden_layers=layers)
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
        return path
    return build_shaped(shape, path, layers=layers, sharded=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0_5b", help="a fixtures.shapes name (qwen2 family) or tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--quantize", default="w4bf16")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--chip", default="bm1684x")
    parser.add_argument("--work", type=Path, default=Path("build/bench-vs-llm-convert"))
    parser.add_argument("--accuracy", action="store_true", help="also prefill through both bmodels on the simulator")
    parser.add_argument("--json", type=Path, help="Also write the figures here (bench/readme_tables.py reads it).")
    args = parser.parse_args()
    if installed("sophgo") is None or shutil.which("parallel") is None:
        raise SystemExit("needs `surgery toolchain install sophgo` and GNU parallel (apt-get install parallel)")
    root = args.work.absolute()
    root.mkdir(parents=True, exist_ok=True)
    model = build_model(root, args.shape, args.layers)
    flags = ["-s", str(args.seq_length), "-q", args.quantize, "-g", str(args.group), "-c", args.chip]
    results: dict[str, tuple[Measured, Path]] = {}
    for check in ("none", "sample"):
        out = root / f"surgery-{check}"
        shutil.rmtree(out, ignore_errors=True)
        cache = root / f"cache-{check}"  # cold: no compiled graph reused from earlier runs
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "SURGERY_CACHE": str(cache)}
        measured = run(f"surgery convert --check {check}", [SURGERY, "convert", "auto", "-m", str(model), *flags,
                                                              "-o", str(out), "--check", check, "--json"],
                       root / f"surgery-{check}.log", env=env)
        results[f"surgery (check {check})"] = measured, next(out.glob("*.bmodel"))
    theirs = root / "llm_convert"
    shutil.rmtree(theirs, ignore_errors=True)
    (root / "llm_convert_work").mkdir(exist_ok=True)
    measured = run("llm_convert", ["llm_convert", "-m", str(model), *flags, "--do_sample", "-o", str(theirs)],
                   root / "llm_convert.log", cwd=root / "llm_convert_work", env=bin_env("sophgo"))
    results["llm_convert"] = measured, next(theirs.glob("*.bmodel"))
    print(f"\n{args.shape} x {args.layers} layers (bf16 checkpoint), {args.quantize} g{args.group}, "
          f"seq {args.seq_length}, {args.chip}; measured side by side on this machine\n")
    print(f"{'':<24}{'wall s':>9}{'peak tree MB':>14}{'peak proc MB':>14}{'bmodel bytes':>15}{'device weight':>15}")
    rows = {}
    for label, (m, bmodel) in results.items():
        rows[label] = (m.seconds, m.peak_tree_mb, m.peak_process_mb, bmodel.stat().st_size, device_weight(bmodel))
        print(f"{label:<24}{m.seconds:>9.1f}{m.peak_tree_mb:>14,.0f}{m.peak_process_mb:>14,.0f}"
              f"{rows[label][3]:>15,}{rows[label][4]:>15,}")
    base = rows["llm_convert"]
    print("\nratios to llm_convert (goal: wall <= 1.0x with checks off, <= 2.0x with default checks; RSS, size and "
          "device weight <= 1.0x)")
    for label in [k for k in rows if k != "llm_convert"]:
        r = rows[label]
        print(f"  {label:<22} wall {r[0] / base[0]:.2f}x  tree RSS {r[1] / base[1]:.2f}x  "
              f"bmodel {r[3] / base[3]:.2f}x  device weight {r[4] / base[4]:.2f}x")
    if args.json:
        write_json(args.json, {"bench": "vs_llm_convert", "shape": args.shape, "layers": args.layers,
                               "seq": args.seq_length, "quantize": args.quantize, "group": args.group,
                               "chip": args.chip, "base": "llm_convert",
                               "rows": {label: dict(zip(("wall", "tree_mb", "proc_mb", "bytes", "device_weight"), r,
                                                        strict=True)) for label, r in rows.items()}})
    if args.accuracy:
        from accuracy_sophgo import compare_prefill

        for label, (_, bmodel) in results.items():
            if "none" in label:
                continue
            hidden_cos, same = compare_prefill(model, bmodel, args.seq_length, root / f"sim-{label.split()[0]}")
            print(f"  prefill on the simulator, {label}: final hidden cosine {hidden_cos:.5f} vs transformers, "
                  f"next token {'same' if same else 'DIFFERENT'}")
    np.set_printoptions()


if __name__ == "__main__":
    main()
