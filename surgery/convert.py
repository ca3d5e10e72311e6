"""`surgery convert`: HF directory -> apply -> export -> optimize -> compile -> verify -> a device bundle
and a report. Each stage writes its own directory under `<out>/stages/`; `convert.json` records what each
finished stage was made from, so a rerun skips the stages whose inputs did not change.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.apply import plan_apply, read_config, write_plan
from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json, link_tree, sha256_text
from surgery.manifest import Manifest
from surgery.memwatch import PeakWatch
from surgery.outputs import Output, claim
from surgery.packs import ApplyOptions, check_seq_length, resolve_pack

STATE = "convert.json"
SOPHGO = ("bm1684x", "bm1688", "cv186ah")
AXERA = ("ax650", "ax630c")


@dataclass(frozen=True)
class ConvertOptions:
    pack: str
    model_path: Path
    out_dir: Path
    seq_length: int = 512
    quantize: str = "w4bf16"
    q_group_size: int = 64
    chip: str = "bm1684x"
    num_device: int = 1
    num_core: int = 1
    symmetric: bool = False
    max_input_length: int | None = None
    embedding_disk: bool = False
    trust_remote_code: bool = False
    jobs: int = 2
    check: str = "sample"  # none | sample | all: graphs checked at every stage (surgery/checks.py)
    force: bool = False  # replace a bundle surgery wrote for another model


@dataclass
class Stage:
    name: str
    run: Callable[[Path], dict]
    inputs: dict  # what the stage is made from; a change reruns it and everything after


def mnn_bits(quantize: str) -> int | None:
    return {"w4bf16": 4, "w4f16": 4, "w8bf16": 8, "w8f16": 8}.get(quantize)


def convert(o: ConvertOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    model, out = Path(o.model_path), Path(o.out_dir)
    config = read_config(model)[0]
    pack = resolve_pack(o.pack, config)
    if o.chip not in (*SOPHGO, *AXERA, "mnn"):
        raise SurgeryError(f"unknown chip {o.chip!r}; choose one of {', '.join((*SOPHGO, *AXERA, 'mnn'))}")
    from surgery.checks import LEVELS
    from surgery.compile.sophgo import QUANTS
    from surgery.compile.toolchains import python_of

    if o.quantize not in QUANTS:
        raise SurgeryError(f"-q {o.quantize!r} is not a quantization; choose one of {', '.join(QUANTS)}")
    if o.check not in LEVELS:
        raise SurgeryError(f"--check {o.check!r}: choose one of {', '.join(LEVELS)}")
    if o.q_group_size <= 0 or o.q_group_size & (o.q_group_size - 1):
        raise SurgeryError(f"-g {o.q_group_size} must be a power of two (32, 64, 128, ...)")
    check_seq_length(o.seq_length, config)
    if o.chip in SOPHGO or o.chip == "mnn":  # before hours of work, not after: a missing compiler is one line
        python_of("sophgo" if o.chip in SOPHGO else "mnn")
    if o.max_input_length is not None and not 0 < o.max_input_length < o.seq_length:
        raise SurgeryError(f"--max_input_length {o.max_input_length} must be between 1 and seq_length - 1")
    if config.get("auto_map") and not o.trust_remote_code:
        raise SurgeryError(f"{model} ships its own modeling code (auto_map); pass --trust-remote-code if you trust it")
    # a native pack's patched code is transformers' own file rewritten by us: no consent needed for that
    trust = o.trust_remote_code or bool(pack.sources)
    owned = claim(out, "convert", {"model": model}, o.force)
    owned.add("stages/", STATE, "report.md", "report.html", "runtime_config.json", "manifest.json")
    stages_dir = out / "stages"
    timings: dict[str, float] = {}
    peaks: dict[str, dict[str, float]] = {}
    # TPU-MLIR builds its table nets in the chip's float type: export the tables in bf16 once, not fp32
    table_dtype = "bf16" if o.chip in SOPHGO and o.quantize in ("bf16", "w8bf16", "w4bf16") else None

    def do_apply(dst: Path) -> dict:
        plan = plan_apply(pack, model, ApplyOptions(seq_length=o.seq_length, dtype="fp32"))
        write_plan(plan, dst, force=True)
        return {"diff": plan.diff(), "patches": [r.as_dict() for r in plan.results]}

    def do_export(dst: Path) -> dict:
        from surgery.export.exporter import ExportOptions, export_model
        from surgery.export.verify import verify_export

        export_model(stages_dir / "apply", dst, ExportOptions(seq_length=o.seq_length, embedding_disk=o.embedding_disk,
                                                              trust_remote_code=trust, table_dtype=table_dtype))
        rows = verify_export(dst, trust_remote_code=trust, level=o.check) if o.check != "none" else []
        return {"parity": [r.as_dict() for r in rows]}

    def do_optimize(dst: Path) -> dict:
        from surgery.optimize import optimize_dir

        link_tree(stages_dir / "export", dst)
        reports = optimize_dir(dst, o.chip, keep=False, check=o.check)
        return {"graphs": {r.graph: {"cosine": r.cosine, "counts": r.counts} for r in reports}}

    def do_compile(dst: Path) -> dict:
        src = stages_dir / "optimize"
        if o.chip == "mnn":
            from surgery.compile.mnn import compile_mnn

            manifest = compile_mnn(src, dst, bits=mnn_bits(o.quantize), block=o.q_group_size, jobs=o.jobs,
                                   check=o.check)
        elif o.chip in AXERA:
            from surgery.compile.axera import AxeraOptions, compile_axera

            manifest = compile_axera(src, dst, AxeraOptions(chip=o.chip))
        else:
            from surgery.compile.sophgo import SophgoOptions, compile_sophgo

            manifest = compile_sophgo(src, dst, SophgoOptions(o.chip, o.quantize, o.q_group_size, o.symmetric,
                                                              o.num_core, o.num_device, o.jobs, o.check))
        return {"parity": manifest.compiled.get("parity", [])}

    model_hash = sha256_text(json.dumps({p.name: [p.stat().st_size, int(p.stat().st_mtime)]
                                         for p in sorted(model.iterdir()) if p.is_file()}, sort_keys=True))
    opts = {k: str(v) for k, v in asdict(o).items() if k not in ("out_dir", "jobs")}
    stages = [
        Stage("apply", do_apply, {"model": model_hash, "pack": pack.name, "seq": o.seq_length}),
        Stage("export", do_export, {"embedding_disk": o.embedding_disk, "tables": table_dtype, "check": o.check}),
        Stage("optimize", do_optimize, {"target": o.chip, "check": o.check}),
        Stage("compile", do_compile, opts),
    ]
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    done = state.get("stages", {})
    key = ""
    results = {}
    stale = False
    for stage in stages:
        key = sha256_text(key + json.dumps(stage.inputs, sort_keys=True))
        dst = stages_dir / stage.name
        record = done.get(stage.name)
        if not stale and record and record["key"] == key and dst.exists():
            results[stage.name] = record["result"]
            timings[stage.name] = record["seconds"]
            peaks[stage.name] = record.get("peak_mb", {})
            continue
        stale = True
        progress(stage.name)
        shutil.rmtree(dst, ignore_errors=True)
        start = time.perf_counter()
        with PeakWatch() as watch:
            results[stage.name] = stage.run(dst)
        timings[stage.name] = time.perf_counter() - start
        peaks[stage.name] = {"process": watch.process_mb, "tree": watch.tree_mb}
        done[stage.name] = {"key": key, "result": results[stage.name], "seconds": timings[stage.name],
                            "peak_mb": peaks[stage.name]}
        atomic_write_json(state_path, {"options": opts, "stages": done})
    bundle(out, o, pack.name, owned)
    from surgery.report import write_report

    write_report(out, results, timings, o, peaks)
    return {"out": str(out), "timings": timings, "peak_mb": peaks}


def bundle(out: Path, o: ConvertOptions, pack: str, owned: Output) -> None:
    """Copy what a device runtime needs to the top of `out`, with a runtime config."""
    compiled = out / "stages" / "compile"
    manifest = Manifest.read(compiled)
    files = sorted({g.file for g in manifest.graphs if (compiled / g.file).is_file()})
    extra = [*manifest.tokenizer_files]
    if manifest.embedding_file:
        extra.append(manifest.embedding_file["file"])
    if manifest.compiled and manifest.compiled.get("embedding"):
        extra.append(manifest.compiled["embedding"]["file"])
    owned.add(*files, *extra, *(["axera_build_kit/"] if o.chip in AXERA else []))
    for name in [*files, *extra]:
        shutil.copyfile(compiled / name, out / name)
    if o.chip in AXERA:
        shutil.copytree(compiled, out / "axera_build_kit", dirs_exist_ok=True)
    manifest.write(out)
    runtime = {
        "chip": o.chip, "backend": manifest.backend, "pack": pack, "model_files": files,
        "seq_length": manifest.seq_length, "max_input_length": o.max_input_length or manifest.seq_length - 1,
        "hidden_size": manifest.hidden_size, "num_layers": manifest.num_layers,
        "kv_heads": manifest.num_kv_heads, "head_dim": manifest.head_dim, "vocab_size": manifest.vocab_size,
        "bos_token_id": manifest.bos_token_id, "eos_token_id": manifest.eos_token_id,
        "chat_template": manifest.chat_template, "tokenizer_files": manifest.tokenizer_files,
        "embedding": (manifest.embedding_file or (manifest.compiled or {}).get("embedding")),
        "mask_value": manifest.conventions["mask"]["value"], "kv_layout": manifest.conventions["kv_layout"],
    }
    atomic_write_json(out / "runtime_config.json", runtime)

