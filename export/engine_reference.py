"""The engine graph's prefill logits computed by the patched model itself, in torch, one layer resident.

MNN's engine layout is built from the patched model, not from the per-block ONNX graphs, so its check needs
no exported graphs either: the same computation as the engine graph (export/engine.py, `EngineGraph`), run
eagerly with the patched attention (additive causal mask) instead of the fused node, weights streamed
layer by layer. At 7B that holds one layer and the head, as the onnxruntime reference did, without 28 GB
of fp32 graphs on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from surgery.export.engine import EngineGraph
from surgery.export.jobs import ExportOptions
from surgery.export.source import export_spec_for, load_streaming


def prefill_logits(model_dir: Path, ids: list[int], trust_remote_code: bool = False,
                   bf16_rows: bool = False, adapter: Path | None = None) -> np.ndarray:
    """Logits [vocab] after `ids`, embedding rows read from the checkpoint as the engine's input; with
    `bf16_rows` rounded to bf16 first, as the engine reads them from `embeddings_bf16.bin`, so that a float
    bundle is measured on its graph and weights, not on the table's storage (a model whose layers add little
    to the embedding, as MiniCPM's muP residual scale makes them, passes that rounding on to the logits).
    `adapter`: a LoRA adapter merged on top (the reference of an adapter shipped separately)."""
    resident, config = load_streaming(Path(model_dir), ExportOptions(seq_length=len(ids) + 1, dtype="fp32",
                                                                     trust_remote_code=trust_remote_code))
    if adapter is not None:
        from surgery.export.lora import MergedIndex, read_adapter

        resident.index = MergedIndex(resident.index, read_adapter(Path(adapter)))
    spec = export_spec_for(config["model_type"])
    graph = EngineGraph(spec, resident.model, config["model_type"]).eval()
    key = resident.aliases.get(f"{spec.embedding}.weight", f"{spec.embedding}.weight")
    n = len(ids)
    rows = torch.cat([resident.index.rows(key, i, i + 1) for i in ids])
    hidden = graph.embedded((rows.to(torch.bfloat16) if bf16_rows else rows).float()[None])
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    positions = torch.arange(n, dtype=torch.int32)[None]
    try:
        with torch.no_grad():
            cos, sin = graph.engine.rope(graph.rotary, hidden, positions)
            for i, layer in enumerate(graph.layers):
                resident.hold([f"{spec.layers}.{i}"])
                hidden = spec.call_block(layer, hidden, cos, sin, mask, None)[0]
            resident.hold([spec.final_norm, spec.lm_head])
            return graph.logits(hidden[:, -1:, :]).reshape(-1).float().numpy()
    finally:
        resident.hold([])
