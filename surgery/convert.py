"""`surgery convert`: HF directory -> apply -> export (+verify) -> optimize -> compile (+checks) -> a device
bundle with a runtime config and a report. The chip's adapter (compile/registry.py) says which optimize
pipeline, which table dtype and which toolchain; every option is checked before the first stage starts.
Stages resume (surgery/stages.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from surgery.apply import plan_apply, read_config, write_plan
from surgery.compile.base import CompileOptions
from surgery.compile.registry import adapter_for
from surgery.errors import SurgeryError
from surgery.export.checkpoint import attach_lora, check_lora
from surgery.export.quant_config import detect
from surgery.fsutil import atomic_write_json, link_or_copy, link_tree, sha256_text
from surgery.manifest import Manifest
from surgery.outputs import Output, claim
from surgery.packs import ApplyOptions, check_seq_length, resolve_pack
from surgery.source_quant import resolve, source_summary
from surgery.stages import Stage, run_stages

STATE = "convert.json"


@dataclass(frozen=True)
class ConvertOptions:
    pack: str
    model_path: Path
    out_dir: Path
    seq_length: int = 512
    quantize: str | None = None  # None: from a GPTQ/AWQ checkpoint, else w4bf16 (surgery/source_quant.py)
    q_group_size: int | None = None  # None: the checkpoint's group size, else 64
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
    executor: str = "local"  # or "ray": graph builds on a Ray cluster (compile/executors.py)
    address: str | None = None  # the Ray cluster
    layout: str = "runtime"  # the adapter's output layout (compile/base.py)
    lora: Path | None = None  # a PEFT adapter merged into the weights (export/lora.py)
    lora_mode: str = "merged"
    image_size: tuple[int, int] | None = None  # VL models: the vision graph's image size (None: the pack's)

    def compile_options(self) -> CompileOptions:
        separate = str(self.lora) if self.lora is not None and self.lora_mode == "separate" else None
        return CompileOptions(self.chip, self.quantize, self.q_group_size, self.symmetric, self.num_core,
                              self.num_device, self.jobs, self.check, self.layout, separate)


# Compiler workers are started while export and optimize run, and with checks off build the vocabulary-table
# graphs there as export finishes them (half a 0.5B conversion's compile work), unless the table reaches this
# size: at 7B the workers' GBs would sit on top of export's and optimize's peaks (6.8 GB for the process tree
# instead of 5.0 with idle workers alone), and the minutes of a 7B compile are not shortened much by it.
PREWARM_BELOW = 1 << 30


def convert(o: ConvertOptions, progress: Callable[[str], None] = lambda s: None) -> dict:
    model, out = Path(o.model_path), Path(o.out_dir)
    config = read_config(model)[0]
    quantize, group = resolve(o.quantize, o.q_group_size, detect(model, config))  # GPTQ/AWQ: from the checkpoint
    o = replace(o, quantize=quantize, q_group_size=group)
    lora = check_lora(o.lora, o.lora_mode)
    pack = resolve_pack(o.pack, config)
    adapter = adapter_for(o.chip)
    adapter.preflight(o.compile_options())  # options and toolchain: before hours of work, not after
    check_seq_length(o.seq_length, config)
    if o.max_input_length is not None and not 0 < o.max_input_length < o.seq_length:
        raise SurgeryError(f"--max_input_length {o.max_input_length} must be between 1 and seq_length - 1")
    if config.get("auto_map") and not o.trust_remote_code:
        raise SurgeryError(f"{model} ships its own modeling code (auto_map); pass --trust-remote-code if you trust it")
    # a native pack's patched code is transformers' own file rewritten by us: no consent needed for that
    trust = o.trust_remote_code or bool(pack.sources)
    owned = claim(out, "convert", {"model": model}, o.force)
    owned.add("stages/", STATE, "report.md", "report.html", "runtime_config.json", "manifest.json")
    stages_dir = out / "stages"
    table_dtype = adapter.table_dtype(o.compile_options())
    graphs = adapter.compiles_graphs(o.compile_options())  # MNN's engine is built from the patched model
    ahead = None  # table builds started during export (compile/sophgo_ahead.py), set below

    def do_apply(dst: Path) -> dict:
        plan = plan_apply(pack, model, ApplyOptions(seq_length=o.seq_length, dtype="fp32"))
        write_plan(plan, dst, force=True)
        if o.lora is not None and o.lora_mode == "merged":
            attach_lora(dst, o.lora)
        return {"diff": plan.diff(), "patches": [r.as_dict() for r in plan.results]}

    def do_export(dst: Path) -> dict:
        from surgery.export.exporter import ExportOptions, export_model
        from surgery.export.verify import verify_export

        export_model(stages_dir / "apply", dst, ExportOptions(seq_length=o.seq_length, embedding_disk=o.embedding_disk,
                                                              trust_remote_code=trust, table_dtype=table_dtype,
                                                              graphs=graphs, image_size=o.image_size),
                     ready=ahead.offer if ahead else None)
        rows = verify_export(dst, trust_remote_code=trust, level=o.check) if graphs and o.check != "none" else []
        return {"parity": [r.as_dict() for r in rows]}

    def do_optimize(dst: Path) -> dict:
        from surgery.optimize import optimize_dir

        link_tree(stages_dir / "export", dst)
        if not adapter.compiles_graphs(o.compile_options()):
            return {"graphs": {}, "skipped": f"{adapter.name} builds its {o.layout} layout from the patched model"}
        reports = optimize_dir(dst, adapter.target(o.chip), keep=False, check=o.check)
        return {"graphs": {r.graph: {"cosine": r.cosine, "counts": r.counts} for r in reports}}

    def do_compile(dst: Path) -> dict:
        executor = None
        if o.executor == "ray":
            from surgery.compile.executors import RayExecutor

            executor = RayExecutor(o.address, o.jobs)
        try:
            compiled = adapter.compile(stages_dir / "optimize", dst, o.compile_options(), executor=executor,
                                       **({"ahead": ahead} if ahead else {}))
        finally:
            if executor is not None:
                executor.close()
        kept = compiled.compiled.details.get("checkpoint_codes") or []  # linears compiled from the checkpoint's codes
        source = source_summary(stages_dir / "apply", config, adapter.name, o.compile_options(), kept)
        return {"parity": compiled.compiled.parity, "source": source}

    model_hash = sha256_text(json.dumps({p.name: [p.stat().st_size, int(p.stat().st_mtime)]
                                         for p in sorted(model.iterdir()) if p.is_file()}, sort_keys=True))
    opts = {k: str(v) for k, v in asdict(o).items() if k not in ("out_dir", "jobs", "force", "executor", "address")
            and (o.lora is not None or k not in ("lora", "lora_mode"))  # float runs keep their old keys
            and (o.image_size is not None or k != "image_size")}  # so do text-only ones
    stages = [
        Stage("apply", do_apply, {"model": model_hash, "pack": pack.name, "seq": o.seq_length,
                                  **({"lora": lora} if lora else {}),
                                  **({"lora_mode": o.lora_mode} if lora and o.lora_mode != "merged" else {})}),
        Stage("export", do_export, {"embedding_disk": o.embedding_disk, "tables": table_dtype, "check": o.check,
                                     "graphs": graphs, **({"image_size": list(o.image_size)} if o.image_size else {})}),
        Stage("optimize", do_optimize, {"target": adapter.target(o.chip), "check": o.check,
                                         "passes": adapter.compiles_graphs(o.compile_options())}),
        Stage("compile", do_compile, opts),
    ]
    if o.executor == "local" and table_bytes(config) < PREWARM_BELOW:
        adapter.prewarm(o.compile_options())  # compiler workers start while export and optimize run
        if o.check == "none":  # and build the tables meanwhile (compile/sophgo_ahead.py says why only then)
            ahead = adapter.build_ahead(o.compile_options(), stages_dir / "ahead")
    run = run_stages(stages, stages_dir, out / STATE, opts, progress)
    bundle(out, o, pack.name, owned)
    from surgery.report import write_report

    write_report(out, run.results, run.seconds, o, run.peak_mb)
    return {"out": str(out), "timings": run.seconds, "peak_mb": run.peak_mb}


def table_bytes(config: dict) -> int:
    """The vocabulary table's size in bf16, from config.json (0 when the config does not say)."""
    vocab = config.get("vocab_size") or config.get("padded_vocab_size") or 0
    return int(vocab) * int(config.get("hidden_size") or 0) * 2


def bundle(out: Path, o: ConvertOptions, pack: str, owned: Output) -> None:
    """Copy what a device runtime needs to the top of `out`, with a runtime config."""
    compiled_dir = out / "stages" / "compile"
    manifest = Manifest.read(compiled_dir)
    compiled = manifest.compiled
    files = [f for f in compiled.files if not f.endswith("/")]
    folders = [f.rstrip("/") for f in compiled.files if f.endswith("/")]
    extra = [*manifest.tokenizer_files, *([manifest.embedding_file["file"]] if manifest.embedding_file else [])]
    owned.add(*files, *extra, *(f"{d}/" for d in folders))
    for name in dict.fromkeys([*files, *extra]):
        (out / name).unlink(missing_ok=True)
        link_or_copy(compiled_dir / name, out / name)  # a 7B bmodel is GBs: a link, not a copy
    for name in folders:
        shutil.copytree(compiled_dir / name, out / name, dirs_exist_ok=True)
    manifest.write(out)
    runtime = {
        "chip": o.chip, "adapter": compiled.adapter, "backend": manifest.backend, "pack": pack, "model_files": files,
        "seq_length": manifest.seq_length, "max_input_length": o.max_input_length or manifest.seq_length - 1,
        "hidden_size": manifest.hidden_size, "num_layers": manifest.num_layers,
        "kv_heads": manifest.num_kv_heads, "head_dim": manifest.head_dim, "vocab_size": manifest.vocab_size,
        "bos_token_id": manifest.bos_token_id, "eos_token_id": manifest.eos_token_id,
        "chat_template": manifest.chat_template, "tokenizer_files": manifest.tokenizer_files,
        "embedding": manifest.embedding_file or compiled.details.get("embedding"),
        "contract": manifest.contract, "final_norm": manifest.conventions.get("final_norm", "lm_head"),
        **({"mask_value": manifest.conventions["mask"]["value"], "kv_layout": manifest.conventions["kv_layout"]}
           if manifest.contract == "blocks" else {"conventions": manifest.conventions}),
    }
    atomic_write_json(out / "runtime_config.json", runtime)
