"""`surgery verify`: every exported graph on onnxruntime against the patched torch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from surgery.export.arch import spec_for
from surgery.export.exporter import ExportOptions, load_streaming, plan_jobs, random_inputs
from surgery.manifest import Manifest
from surgery.parity import Parity, compare


def verify_export(onnx_dir: Path, trust_remote_code: bool = False) -> list[Parity]:
    import onnxruntime as ort

    manifest = Manifest.read(onnx_dir)
    manifest.require_numpy_dtype("surgery verify")
    layers = sorted({g.layer for g in manifest.graphs if g.layer is not None})
    options = ExportOptions(seq_length=manifest.seq_length, dtype=manifest.dtype, opset=manifest.opset,
                            blocks=tuple(layers), trust_remote_code=trust_remote_code)
    resident, config = load_streaming(Path(manifest.source["model_dir"]), options)
    jobs = {job.name: job for job in plan_jobs(resident.model, spec_for(config["model_type"]), options)}
    rows = []
    for graph in manifest.graphs:
        feeds = random_inputs(graph, manifest.vocab_size)
        session = ort.InferenceSession(str(onnx_dir / graph.file), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
        resident.hold(jobs[graph.name].needs)
        with torch.no_grad():
            want = jobs[graph.name].module(*(torch.from_numpy(feeds[t.name]) for t in graph.inputs))
        want = want if isinstance(want, tuple) else (want,)
        rows += [compare(graph.name, spec.name, g, w.numpy())
                 for spec, g, w in zip(graph.outputs, got, want, strict=True)]
    if manifest.embedding_file:
        from surgery.runtime import OnnxModel

        spec = spec_for(config["model_type"])
        resident.hold([spec.embedding])
        ids = np.arange(manifest.vocab_size)[None]
        table = OnnxModel(onnx_dir).embed(ids)
        rounded = spec.part(resident.model, spec.embedding).weight.detach().to(torch.bfloat16).float()
        rows.append(compare(manifest.embedding_file["file"], "table (vs bf16 round-to-nearest)", table,
                            rounded.numpy()[None]))
    return rows
