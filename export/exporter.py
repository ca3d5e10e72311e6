"""`surgery export`: a patched model directory -> static per-block ONNX graphs + manifest.json.

Each graph is written to a temp file and renamed; `.export-state.json` remembers finished graphs and
tables (with their hashes and what produced them), so an interrupted export resumes and ends with the
same files. The manifest is written last: a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import onnx

from surgery.apply import RECORD, tool_versions
from surgery.errors import SurgeryError
from surgery.export.act_order import regroup_model
from surgery.export.checkpoint import LORA_DIR, describe
from surgery.export.jobs import DTYPES, ExportOptions, Job, plan_jobs
from surgery.export.source import export_spec_for, load_streaming
from surgery.export.tables import Table, write_table
from surgery.export.trace import export_job
from surgery.export.vision_record import mrope_conventions
from surgery.export.weights import Resident
from surgery.fsutil import STAGING_PREFIX, atomic_write_json, sha256_file, sha256_text
from surgery.manifest import GraphSpec, Manifest, TensorSpec
from surgery.onnxio import data_file
from surgery.outputs import claim
from surgery.packs import check_seq_length

__all__ = ["ExportOptions", "export_model"]

STATE = ".export-state.json"
EMBEDDING_FILE = "embedding.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "qwen.tiktoken", "tokenization_qwen.py", "generation_config.json")


def _tables_for(job: Job, resident: Resident, options: ExportOptions, files: dict[str, str]) -> dict[str, Table]:
    """The vocabulary tables `job` reads, each named after the first graph that uses its checkpoint tensor."""
    if options.exporter != "torchscript":
        return {}  # the dynamo exporter traces real weights
    tables = {}
    for name, path in job.tables.items():
        key = resident.aliases.get(path, path)
        fold = job.folds.get(name)
        slot = key if fold is None else f"{key} (folded)"  # a folded head never shares an embedding's file
        files.setdefault(slot, f"{job.name}.onnx.data")
        dtype = DTYPES[options.table_dtype or options.dtype]
        tables[name] = Table(key, files[slot], dtype, tuple(resident.index.shape(key)), fold=fold)
    return tables


def export_model(model_dir: Path, out: Path, options: ExportOptions,
                 progress: Callable[[str], None] = lambda name: None,
                 ready: Callable[[Path, GraphSpec], None] | None = None) -> Manifest:
    """Export every graph of the block contract; resumes from `.export-state.json`. `ready` hears of each
    graph as soon as its files are final (convert starts compiling vocabulary-table graphs then)."""
    model_dir = Path(model_dir)
    if not 14 <= options.opset <= 20:
        raise SurgeryError(f"--opset {options.opset} is not supported; use 14 to 20 (vendor compilers take 17)")
    resident, config = load_streaming(model_dir, options)
    resident.index, _ = regroup_model(resident.model, resident.index, resident.aliases)  # GPTQ act-order
    check_seq_length(options.seq_length, config)
    model = resident.model
    spec = export_spec_for(config["model_type"])
    n_layers = len(spec.part(model, spec.layers))
    if options.blocks is not None and any(not 0 <= b < n_layers for b in options.blocks):
        raise SurgeryError(f"--blocks {','.join(map(str, options.blocks))} is out of range: the model has "
                           f"{n_layers} layers (0-{n_layers - 1})")
    record = json.loads((model_dir / RECORD).read_text())
    key = sha256_text(json.dumps({"options": asdict(options), "source": record["hashes"],
                                  "weights": _weights_fingerprint(model_dir)}, sort_keys=True))
    owned = claim(out, "export", {"model": model_dir})  # never the model, never what surgery did not write
    clean_interrupted(out)
    owned.add(STATE)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("key") != key:
        state = {"key": key, "graphs": {}, "tables": {}}
    state.setdefault("tables", {})

    checked: set[str] = set()  # tables hashed (or written) by this run: a 2.5 GB table is hashed once

    def ensure_table(table: Table) -> None:
        if table.file in checked:
            return
        existing = _hash(out / table.file)
        if existing is None or state["tables"].get(table.file) != existing:
            progress(table.file)
            owned.add(table.file)
            state["tables"][table.file] = write_table(resident.index, table, out)
            atomic_write_json(state_path, state)
        checked.add(table.file)

    graphs, table_files = [], {}
    size = options.image_size or (spec.vision.size(model.config) if spec.vision else None)
    vision = spec.vision.record(model_dir, model.config, config, spec, size, options.seq_length) if spec.vision \
        else None
    jobs = plan_jobs(model, spec, options.seq_length, options.dtype, options.blocks,
                     embedding_graphs=not options.embedding_disk, image_size=size) if options.graphs else []
    for job in jobs:
        path = out / f"{job.name}.onnx"
        tables = _tables_for(job, resident, options, table_files)
        for table in tables.values():
            ensure_table(table)
        done = state["graphs"].get(job.name)
        if not (done and _hashes(path, checked) == done["hashes"]):
            progress(job.name)
            owned.add(path.name, data_file(path).name)
            resident.hold(job.needs, skip={job.tables[n] for n in tables})
            outputs = export_job(job, path, options.opset, tables, options.external_data_above, options.exporter)
            done = {"hashes": _hashes(path, checked), "outputs": [asdict(o) for o in outputs]}
            state["graphs"][job.name] = done
            atomic_write_json(state_path, state)
        inputs = [TensorSpec(n, list(t.shape), _np_dtype(t)) for n, t in job.inputs.items()]
        data = next(iter(tables.values())).file if tables else (data_file(path).name if data_file(path).exists()
                                                                 else None)
        data_sha = None if data is None else state["tables"].get(data) or done["hashes"].get(data)
        graphs.append(GraphSpec(job.name, path.name, job.kind, inputs, [TensorSpec.of(o) for o in done["outputs"]],
                                done["hashes"][path.name], job.layer, data_file=data, data_sha256=data_sha))
        if ready is not None:
            ready(out, graphs[-1])
    embedding_file = None
    cfg = spec.text(model.config)  # a VL model's language model
    if options.embedding_disk:
        table = Table(resident.aliases.get(f"{spec.embedding}.weight", f"{spec.embedding}.weight"), EMBEDDING_FILE,
                      DTYPES["bf16"], (cfg.vocab_size, cfg.hidden_size))
        ensure_table(table)
        embedding_file = {"file": EMBEDDING_FILE, "dtype": "bfloat16", "rounding": "nearest-even",
                          "shape": list(table.shape), "sha256": state["tables"][EMBEDDING_FILE]}
    resident.hold([])
    owned.add(*TOKENIZER_FILES, "manifest.json")
    tokenizer = _copy_tokenizer(model_dir, out)
    manifest = Manifest(
        model_type=config["model_type"], architecture=(config.get("architectures") or ["?"])[0],
        seq_length=options.seq_length, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=spec.num_kv_heads(cfg), head_dim=spec.head_dim(cfg), num_layers=n_layers,
        vocab_size=cfg.vocab_size, dtype=options.dtype,
        opset=max((_opset(out / g.file) for g in graphs), default=options.opset),
        exporter=options.exporter,
        graphs=graphs, bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        chat_template=tokenizer.get("chat_template"), tokenizer_files=tokenizer["files"],
        embedding_file=embedding_file,
        source={"model_dir": str(model_dir.resolve()), "pack": record["pack"], "hashes": record["hashes"],
                "checkpoint": describe(model_dir, config)},  # GPTQ/AWQ quantization, LoRA adapter
        versions=tool_versions() | {"onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")},
        vision=vision,
    )
    if spec.mrope_section:
        manifest.conventions |= mrope_conventions(spec.mrope_section(model.config))
    manifest.write(out)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()
    return manifest


def clean_interrupted(out: Path) -> None:
    """Remove what a killed run leaves: staging directories and half-written temp files."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _copy_tokenizer(model_dir: Path, out: Path) -> dict:
    """Copy the tokenizer files next to the graphs so the export directory is self-contained."""
    files = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    for name in files:
        shutil.copyfile(model_dir / name, out / name)
    info: dict = {"files": files}
    if "tokenizer_config.json" in files:
        info["chat_template"] = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    return info


def _np_dtype(t) -> str:
    return "bfloat16" if str(t.dtype) == "torch.bfloat16" else str(t.detach().numpy().dtype)


def _opset(path: Path) -> int:
    """The default-domain opset a graph was really written with (dynamo may raise the one asked for)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _hashes(path: Path, tables: set[str]) -> dict[str, str] | None:
    """sha256 of a graph file and of its own external data file, if any (tables are hashed on their own);
    None when the graph is missing."""
    if not path.is_file():
        return None
    return {p.name: sha256_file(p) for p in (path, data_file(path)) if p.is_file() and p.name not in tables}


def _weights_fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Size and mtime of each weights file: cheap, and changes when the weights do."""
    files = [*sorted(model_dir.glob("*.safetensors")), *sorted((model_dir / LORA_DIR).glob("*"))]  # + an adapter
    return {str(p.relative_to(model_dir)): [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)
