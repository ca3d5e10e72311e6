"""The graphs of the block contract as export jobs: which wrapper, with which example inputs and names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from surgery.export.arch import ArchSpec
from surgery.export.blocks import Decode, Embedding, GreedyHead, LmHead, Prefill, SampleHead
from surgery.manifest import MASK_VALUE
from surgery.onnxio import EXTERNAL_DATA_ABOVE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ExportOptions:
    seq_length: int
    dtype: str = "fp32"
    blocks: tuple[int, ...] | None = None  # None: every layer
    opset: int = 17
    trust_remote_code: bool = False
    external_data_above: int = EXTERNAL_DATA_ABOVE
    embedding_disk: bool = False  # a raw bf16 table for the host instead of embedding graphs
    exporter: str = "torchscript"  # or "dynamo" (torch.export based; may raise the opset to 18)
    table_dtype: str | None = None  # vocabulary tables: None = the graphs' dtype
    graphs: bool = True  # False: manifest and host files only, for a compiler that builds from the patched model
    image_size: tuple[int, int] | None = None  # VL models: the vision graph's (height, width); None: the spec's


@dataclass
class Job:
    """One graph to export: its wrapper module, example inputs, I/O names."""

    name: str
    kind: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    layer: int | None = None
    needs: tuple[str, ...] = ()  # submodules whose weights must be loaded
    tables: dict[str, str] = field(default_factory=dict)  # wrapper parameter -> model parameter (vocab tables)
    folds: dict[str, Callable] = field(default_factory=dict)  # wrapper parameter -> row fold of its table


def plan_jobs(model: torch.nn.Module, spec: ArchSpec, seq: int, dtype_name: str,
              blocks: tuple[int, ...] | None = None, embedding_graphs: bool = True,
              image_size: tuple[int, int] | None = None) -> list[Job]:
    cfg = spec.text(model.config)  # a VL model's language model; the config itself otherwise
    hidden, dtype = cfg.hidden_size, DTYPES[dtype_name]
    kv, hd = spec.num_kv_heads(cfg), spec.head_dim(cfg)
    layers = spec.part(model, spec.layers)
    chosen = range(len(layers)) if blocks is None else blocks
    cos, sin = spec.rope_tables(model, seq)
    wte = spec.part(model, spec.embedding)
    ids = torch.zeros(1, seq, dtype=torch.int32)
    mask = torch.full((seq, seq), MASK_VALUE).triu(1)[None, None].to(dtype)
    states = torch.randn(1, seq, hidden, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq, dtype=torch.int32)[None]
    sections = spec.mrope_section(model.config) if spec.mrope_section else None
    if sections:  # multimodal RoPE: temporal, height, width components [3, 1, S]
        pos = pos[None].expand(3, 1, seq).contiguous()
    table = {"wte.weight": f"{spec.embedding}.weight"}
    scale = spec.embedding_scale(cfg) if spec.embedding_scale else None
    divisor = spec.head_divisor(cfg) if spec.head_divisor else None
    if scale is not None and not embedding_graphs:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"this model multiplies its embeddings by {scale}, which a raw host-side table "
                           "(--embedding-disk) would drop; export without --embedding-disk")
    jobs = [] if not embedding_graphs else [
        Job("embedding", "embedding", Embedding(wte, scale), {"input_ids": ids}, ["input_states"],
            needs=(spec.embedding,), tables=table),
        Job("embedding_cache", "embedding_cache", Embedding(wte, scale), {"input_ids": ids[:, :1]},
            ["input_states"], needs=(spec.embedding,), tables=table),
    ]
    # two distinct tensors: torch.export merges inputs that are the same object into one graph input
    history_k, history_v = torch.randn(2, 1, seq, kv, hd, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for i in chosen:
        jobs.append(Job(f"block_{i}", "block", Prefill(spec, layers[i], cos, sin, sections),
                        {"input_states": states, "position_ids": pos, "attention_mask": mask},
                        ["hidden_states", "past_k", "past_v"], layer=i, needs=(f"{spec.layers}.{i}",)))
        jobs.append(Job(f"block_cache_{i}", "block_cache", Decode(spec, layers[i], cos, sin, sections),
                        {"input_states": states[:, :1], "position_ids": pos[..., :1],
                         "attention_mask": torch.zeros(1, 1, 1, seq + 1, dtype=dtype),
                         "history_k": history_k, "history_v": history_v},
                        ["hidden_states", "past_k", "past_v"], layer=i, needs=(f"{spec.layers}.{i}",)))
    head = LmHead(spec.part(model, spec.final_norm), spec.part(model, spec.lm_head), divisor)
    jobs.append(Job("lm_head", "lm_head", head, {"hidden_states": states[0, :1]}, ["m_logits"],
                    needs=(spec.final_norm, spec.lm_head), tables={"head.weight": f"{spec.lm_head}.weight"},
                    folds={"head.weight": spec.head_rows} if spec.head_rows else {}))
    jobs.append(Job("greedy_head", "greedy_head", GreedyHead(),
                    {"m_logits": torch.randn(1, cfg.vocab_size, dtype=dtype)}, ["token"]))
    jobs.append(Job("sample_head", "sample_head", SampleHead(),
                    {"m_logits": torch.randn(1, cfg.vocab_size, dtype=dtype), "input_ids": ids,
                     "penalty": torch.tensor([1.1]), "temperature": torch.tensor([0.7]),
                     "top_k": torch.tensor([50], dtype=torch.int32), "top_p": torch.tensor([0.8])},
                    ["probs", "tokens"]))
    if spec.vision is not None:
        jobs.append(vision_job(model, spec, image_size or spec.vision.size(model.config), dtype))
    return jobs


def vision_job(model: torch.nn.Module, spec: ArchSpec, size: tuple[int, int], dtype: torch.dtype) -> Job:
    """The `vision` graph: the pixels of one image of `size` (as the spec lays them out) -> its embeddings."""
    grid = spec.vision.grid(model.config, size)
    shape = spec.vision.input_shape(model.config, grid)
    pixels = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    module = spec.vision.build(model, grid)
    return Job("vision", "vision", module, {"pixel_values": pixels}, ["image_embeds"], needs=spec.vision.needs())
