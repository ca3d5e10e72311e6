"""The single graph MNN's LLM engine runs (`llm.mnn`), built from our patched model with streamed weights.

The engine (transformers/llm/engine/src/llm.cpp in alibaba/MNN) loads one module with inputs `input_ids`
(which carries the embeddings, float [seq, 1, H]), `attention_mask`, `position_ids` (int32 [1, seq]) and
`logits_index` (int32 [1]), and one output `logits`; it never feeds K/V tensors. The KV cache lives inside
MNN's `Attention` op. So the graph is every layer of the patched model called without history, with the
attention core replaced by a `LlmExporter::FusedAttention` node (q/k/v after RoPE, BSHD) that the MNN
adapter turns into that op after conversion (compile/mnn_llm.py). Where a family keeps that core and its
rotary state is the pack's data (`ArchSpec.engine`, export/engine_spec.py), so native and remote-code
families share this graph. The mask reaches only those nodes: on CPU the engine passes a scalar 0 and
causality comes from the op's KV metadata.

Weights: traced as graph inputs backed by stride-0 stand-ins (no memory), then attached layer by layer from
safetensors into `<graph>.data` (export/trace.py), so at most one layer is resident at once.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from surgery.errors import SurgeryError
from surgery.export.act_order import regroup_model
from surgery.export.arch import ArchSpec
from surgery.export.engine_linear import LinearWeights, weightless_linears
from surgery.export.engine_spec import EngineSpec
from surgery.export.jobs import ExportOptions
from surgery.export.source import export_spec_for, load_streaming
from surgery.export.trace import ParamsAsInputs, _attach_weights, unique_parameters
from surgery.export.weights import Resident
from surgery.fsutil import STAGING_PREFIX
from surgery.onnxio import data_file, save_graph

INPUTS = ["input_ids", "attention_mask", "position_ids", "logits_index"]  # llm.cpp Module::load, this order
OUTPUTS = ["logits"]
DOMAIN = "LlmExporter"  # the custom domain MNNConvert keeps as `Extra` ops (--allowCustomOp)
OPSET = 15
DYNAMIC = {"input_ids": {0: "seq"}, "attention_mask": {2: "seq", 3: "seq"}, "position_ids": {1: "seq"}}


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v over the engine's cache; exported as one custom node."""

    @staticmethod
    def symbolic(g, q, k, v, mask, out_dim: int, layer: int):
        return g.op(f"{DOMAIN}::FusedAttention", q, k, v, mask, output_dim_i=out_dim, kv_cache_i=1,
                    layer_index_i=layer, kv_shared_layer_index_i=-1, name_s=f"/layers.{layer}/FusedAttention")

    @staticmethod
    def forward(ctx, q, k, v, mask, out_dim: int, layer: int):  # the math, for the trace only (no cache)
        rep = q.shape[2] // k.shape[2]
        q, k, v = q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask
        return (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(q.shape[0], -1, out_dim)


@dataclass(frozen=True)
class FusedSlot:
    """What one layer's FusedAttention node is told: plain ints (traced sizes break `apply()`)."""

    layer: int
    heads: int
    head_dim: int
    kv_heads: int


def fused_attention(module, query, key, value, attention_mask, scaling: float):
    """The attention core as one FusedAttention node ([B, heads, S, D] in after RoPE, [B, S, heads, D] out), for
    the attention `module` stamped with its `FusedSlot` (the families' drop-ins in export/engine_spec.py call
    this). MNN's op scales by 1/sqrt(D); another scaling is folded into q."""
    slot: FusedSlot = module.surgery_fused_slot
    d = slot.head_dim
    q = query.transpose(1, 2)
    if abs(scaling - d ** -0.5) > 1e-9:
        q = q * (scaling * d ** 0.5)
    out = FusedAttention.apply(q, key.transpose(1, 2), value.transpose(1, 2), attention_mask, slot.heads * d,
                               slot.layer)
    return out.view(1, -1, slot.heads, d), None


@contextlib.contextmanager
def attention_fused(engine: EngineSpec, attention: torch.nn.Module) -> Iterator[None]:
    """Point the family's attention core (`engine.core`: a function of the attention's modeling module, or a
    method of its class) at the family's fused drop-in while tracing."""
    owner = sys.modules.get(type(attention).__module__) if engine.core_scope == "module" else type(attention)
    if owner is None or not hasattr(owner, engine.core):
        raise SurgeryError(f"{type(attention).__name__} has no `{engine.core}` attention core to replace, which the "
                           "pack's engine spec names; use --layout graphs for this model")
    original = owner.__dict__[engine.core] if engine.core_scope == "class" else getattr(owner, engine.core)
    setattr(owner, engine.core, engine.fused)
    try:
        yield
    finally:
        setattr(owner, engine.core, original)


class EngineGraph(torch.nn.Module):
    """input_ids = embeddings [S, 1, H], attention_mask, position_ids int32 [1, S], logits_index int32 [1]
    -> logits [1, n, V] for the tokens from logits_index on (-1: the last)."""

    def __init__(self, spec: ArchSpec, model: torch.nn.Module, model_type: str) -> None:
        super().__init__()
        if spec.engine is None:
            raise SurgeryError(f"the {model_type!r} pack declares no engine spec (ArchSpec.engine: its attention "
                               "core and rotary module), which MNN's engine layout needs; use --layout graphs")
        reason = spec.engine.unsupported(model) if spec.engine.unsupported else None
        if reason:
            raise SurgeryError(reason)
        self.spec, self.engine, self.hidden = spec, spec.engine, model.config.hidden_size
        # muP scales outside the layers (MiniCPM): the engine feeds raw embedding rows and reads raw logits
        self.scale = spec.embedding_scale(model.config) if spec.embedding_scale else None
        self.divisor = spec.head_divisor(model.config) if spec.head_divisor else None
        self.layers = spec.part(model, spec.layers)
        self.norm, self.head = spec.part(model, spec.final_norm), spec.part(model, spec.lm_head)
        try:
            self.rotary = spec.part(model, self.engine.rotary)
            self.attentions = [layer.get_submodule(self.engine.attention) for layer in self.layers]
        except AttributeError as exc:
            raise SurgeryError(f"the {model_type!r} model does not have what its engine spec names ({exc}); "
                               "use --layout graphs") from None
        heads, head_dim = model.config.num_attention_heads, spec.head_dim(model.config)
        for i, attention in enumerate(self.attentions):
            attention.surgery_fused_slot = FusedSlot(i, heads, head_dim, spec.num_kv_heads(model.config))
        self.paths = {"layers": spec.layers, "norm": spec.final_norm, "head": spec.lm_head}

    def forward(self, input_ids, attention_mask, position_ids, logits_index):
        hidden = self.embedded(input_ids.view(1, -1, self.hidden))
        cos, sin = self.engine.rope(self.rotary, hidden, position_ids)
        for layer in self.layers:
            hidden = self.spec.call_block(layer, hidden, cos, sin, attention_mask, None)[0]
        return self.logits(hidden[:, logits_index.long():, :])

    def embedded(self, rows: torch.Tensor) -> torch.Tensor:
        """The first layer's input from embedding rows as the engine reads them (raw table rows)."""
        return rows * self.scale if self.scale is not None else rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(hidden)
        return self.head(hidden / self.divisor if self.divisor is not None else hidden)

    def owner(self, name: str) -> str:
        """The model submodule whose weights hold parameter `name` of this wrapper (a whole layer at once)."""
        first, _, rest = name.partition(".")
        if first == "layers":
            return f"{self.paths['layers']}.{rest.split('.')[0]}"
        return self.paths[first]


class Streamed(Mapping):
    """Parameters by name, each loaded when asked for: the layer owning it is held, the previous dropped."""

    def __init__(self, graph: EngineGraph, resident: Resident, names: list[str]) -> None:
        self.graph, self.resident, self.names, self.known = graph, resident, names, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        self.resident.hold([self.graph.owner(name)])
        data = self.graph.get_parameter(name).data
        fold = self.graph.spec.head_rows  # Baichuan2's NormHead: the trace reads raw rows, the model normalizes
        return fold(data) if fold is not None and name == "head.weight" else data

    def __contains__(self, name: object) -> bool:  # Mapping's default loads the value (a second pass of every layer)
        return name in self.known

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def standin(param: torch.Tensor) -> torch.Tensor:
    """A tensor of the parameter's shape and dtype that takes no memory (stride 0)."""
    return torch.zeros((), dtype=param.dtype).expand(param.shape)


def export_engine_graph(model_dir: Path, path: Path, trust_remote_code: bool = False, trace_seq: int = 3,
                        weightless: bool = False) -> tuple[dict, LinearWeights | None]:
    """Write `path` (+ `<path>.data`): the whole model as the engine's one graph, fp32. Returns the facts
    the engine's config needs (hidden size, layers, vocabulary, tied head) and, with `weightless`, where
    the linears' weights come from: they are then left out of the graph (export/engine_linear.py)."""
    resident, config = load_streaming(Path(model_dir), ExportOptions(seq_length=trace_seq + 1, dtype="fp32",
                                                                     trust_remote_code=trust_remote_code))
    resident.index, _ = regroup_model(resident.model, resident.index, resident.aliases)  # GPTQ act-order
    spec = export_spec_for(config["model_type"])
    graph = EngineGraph(spec, resident.model, config["model_type"]).eval()
    mask = torch.full((trace_seq, trace_seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # Baichuan2's NormHead is a product with its (normalized) rows, not an nn.Linear: quantized like one
        head = {"head": graph.head} if spec.head_rows and not isinstance(graph.head, torch.nn.Linear) else None
        linears = stack.enter_context(weightless_linears(graph, head)) if weightless else {}
        skip = {f"{name}.{leaf}" for name in linears for leaf in ("weight", "bias")}
        params = {name: p for name, p in unique_parameters(graph).items() if name not in skip}
        args = (torch.zeros(trace_seq, 1, graph.hidden), mask, torch.arange(trace_seq, dtype=torch.int32)[None],
                torch.tensor([-1], dtype=torch.int32), *(standin(p) for p in params.values()))
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}trace-", dir=path.parent))
        traced = Path(scratch) / path.name
        with attention_fused(graph.engine, graph.attentions[0]), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ParamsAsInputs(graph, list(params)), args, str(traced), input_names=[*INPUTS, *params],
                              output_names=OUTPUTS, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              custom_opsets={DOMAIN: 1}, dynamic_axes=DYNAMIC)
        model = onnx.load(str(traced))
    _attach_weights(model, Streamed(graph, resident, list(params)), {}, data_file(path))
    resident.hold([])
    save_graph(model, path)
    facts = {"hidden_size": graph.hidden, "layer_nums": len(graph.layers), "model_type": config["model_type"],
             "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
             "vocab_size": resident.model.config.vocab_size, "chat_template": spec.engine.chat_template}
    folds = {"head": spec.head_rows} if spec.head_rows else {}
    return facts, (LinearWeights(graph, resident, graph.owner, linears, folds) if weightless else None)
