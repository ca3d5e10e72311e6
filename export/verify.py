"""`surgery verify`: every exported graph on onnxruntime against the patched torch module it came from.

Graphs that read a vocabulary table are checked without loading the table whole: the embedding against
the rows its ids select, the head chunk by chunk of rows (so verify stays as lean as export at 7B).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from surgery.contract import random_inputs
from surgery.errors import SurgeryError
from surgery.export.jobs import DTYPES, ExportOptions, Job, plan_jobs
from surgery.export.source import export_spec_for, load_streaming
from surgery.export.tables import Table, row_chunks, rows_for_ids
from surgery.export.trace import ParamsAsInputs, unique_parameters
from surgery.export.weights import Resident
from surgery.fsutil import sha256_file
from surgery.manifest import Manifest
from surgery.onnxio import run_once
from surgery.parity import Parity, compare


def _with_table(job: Job, name: str, value: torch.Tensor, args: list[torch.Tensor]) -> tuple:
    """Run the job's wrapper with its table parameter `name` replaced by `value`."""
    params = unique_parameters(job.module)
    names = list(params)
    values = [value if n == name else p for n, p in params.items()]
    with torch.no_grad():
        out = ParamsAsInputs(job.module, names)(*args, *values)
    return out if isinstance(out, tuple) else (out,)


def reference(job: Job, feeds: dict[str, np.ndarray], resident: Resident, table_dtype: torch.dtype) -> tuple:
    """The torch outputs for `feeds`, holding at most a chunk of any vocabulary table."""
    args = [torch.from_numpy(feeds[name]) for name in job.inputs]
    if not job.tables:
        resident.hold(job.needs)
        with torch.no_grad():
            out = job.module(*args)
        return out if isinstance(out, tuple) else (out,)
    resident.hold(job.needs, skip=set(job.tables.values()))
    (name, path), = job.tables.items()
    key = resident.aliases.get(path, path)
    table = Table(key, "", table_dtype, tuple(resident.index.shape(key)), fold=job.folds.get(name))
    if job.kind in ("embedding", "embedding_cache"):
        rows, ids = rows_for_ids(resident.index, table, args[0])
        return _with_table(job, name, rows.to(resident.dtype), [ids, *args[1:]])
    parts = [_with_table(job, name, chunk.to(resident.dtype), args) for chunk in row_chunks(resident.index, table)]
    return tuple(torch.cat(outs, dim=-1) for outs in zip(*parts, strict=True))


def source_model(onnx_dir: Path, manifest: Manifest) -> Path:
    """The patched model the export came from, only if its code and config are still what was exported: a
    manifest's path is not trusted by itself (verify may run that model's code)."""
    raw = manifest.source.get("model_dir") if isinstance(manifest.source, dict) else None
    model_dir = Path(raw) if isinstance(raw, str) else None
    if model_dir is None or not (model_dir / "surgery.json").is_file():
        raise SurgeryError(f"the model {onnx_dir} was exported from ({raw}) is gone or not a `surgery apply` output; "
                           "re-export to verify")
    for name, digest in (manifest.source.get("hashes") or {}).items():
        path = model_dir / name
        if "/" in name or ".." in name or not path.is_file() or sha256_file(path) != digest.get("after"):
            raise SurgeryError(f"{model_dir / name} changed since {onnx_dir} was exported from it; re-export to "
                               "verify")
    return model_dir


def verify_export(onnx_dir: Path, trust_remote_code: bool = False,
                  progress: Callable[[str], None] = lambda name: None, level: str = "all") -> list[Parity]:
    """Every graph (`level` all) or the sample compile/checks.py picks, against the patched torch model."""
    manifest = Manifest.read(onnx_dir)
    manifest.require_numpy_dtype("surgery verify")
    layers = sorted({g.layer for g in manifest.graphs if g.layer is not None})
    options = ExportOptions(seq_length=manifest.seq_length, dtype=manifest.dtype, opset=manifest.opset,
                            blocks=tuple(layers), trust_remote_code=trust_remote_code)
    resident, config = load_streaming(source_model(onnx_dir, manifest), options)
    spec = export_spec_for(config["model_type"])
    size = tuple(manifest.vision["image_size"]) if manifest.vision else None
    jobs = {job.name: job for job in plan_jobs(resident.model, spec, manifest.seq_length, manifest.dtype,
                                               tuple(layers), image_size=size)}
    table_dtype = DTYPES[manifest.dtype]
    rows = []
    from surgery.checks import sampled

    for graph in sampled(manifest, level):
        progress(graph.name)
        feeds = random_inputs(graph, manifest.vocab_size)
        got = run_once(onnx_dir / graph.file, feeds)
        want = reference(jobs[graph.name], feeds, resident, table_dtype)
        rows += [compare(graph.name, spec_.name, g, w.float().numpy())
                 for spec_, g, w in zip(graph.outputs, got, want, strict=True)]
    if manifest.embedding_file:
        from surgery.runtime import OnnxModel

        key = resident.aliases.get(f"{spec.embedding}.weight", f"{spec.embedding}.weight")
        table = Table(key, "", torch.bfloat16, tuple(manifest.embedding_file["shape"]))
        embed, parts, start = OnnxModel(onnx_dir, prepack=False).embed, [], 0
        for chunk in row_chunks(resident.index, table):
            ids = np.arange(start, start + len(chunk))[None]
            parts.append(compare("", "", embed(ids), chunk.float().numpy()[None]))
            start += len(chunk)
        rows.append(Parity(manifest.embedding_file["file"], "table (vs bf16 round-to-nearest)",
                           min(p.cosine for p in parts), max(p.max_abs for p in parts)))
    resident.hold([])
    return rows
