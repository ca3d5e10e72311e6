"""manifest.json: the one schema every stage after export reads, so no stage guesses a convention."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json

MANIFEST = "manifest.json"
SCHEMA = 1
MASK_VALUE = -10000.0  # additive mask constant: finfo.min overflows half precision, -10000 does not


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name

    @classmethod
    def of(cls, raw: dict) -> TensorSpec:
        return cls(raw["name"], list(raw["shape"]), raw["dtype"])


@dataclass
class GraphSpec:
    name: str
    file: str
    kind: str  # embedding | embedding_cache | block | block_cache | lm_head | greedy_head | sample_head
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: str
    layer: int | None = None
    data_file: str | None = None  # external weights (large graphs; vocabulary tables, shared between graphs)
    data_sha256: str | None = None

    @classmethod
    def of(cls, raw: dict) -> GraphSpec:
        return cls(raw["name"], raw["file"], raw["kind"], [TensorSpec.of(t) for t in raw["inputs"]],
                   [TensorSpec.of(t) for t in raw["outputs"]], raw["sha256"], raw.get("layer"), raw.get("data_file"),
                   raw.get("data_sha256"))


@dataclass
class Compiled:
    """`Manifest.compiled`: what an adapter made, how, and how close it is to onnxruntime."""

    adapter: str
    chip: str
    options: dict
    toolchain: dict
    files: list[str]  # what the device runtime loads, relative to the compiled directory
    check: str = "sample"
    parity: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # adapter-specific: routes, commands, the host embedding, ...

    @classmethod
    def of(cls, raw: dict) -> Compiled:
        return cls(**raw)


@dataclass
class Manifest:
    model_type: str
    architecture: str
    seq_length: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int
    dtype: str
    opset: int
    exporter: str
    graphs: list[GraphSpec]
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    chat_template: str | None = None
    tokenizer_files: list[str] = field(default_factory=list)
    embedding_file: dict | None = None  # with --embedding-disk: {file, dtype bfloat16, shape, rounding, sha256}
    optimizations: list[dict] = field(default_factory=list)  # `surgery optimize` runs: target, passes, counts
    backend: str = "onnxruntime"  # what runs the graph files: onnxruntime, mnn, bmodel, ...
    compiled: Compiled | None = None  # `surgery compile`: adapter, chip, options, toolchain, files, parity
    conventions: dict = field(default_factory=lambda: {
        "kv_layout": "BSHD [1, seq, kv_heads, head_dim]",
        "mask": {"kind": "additive", "value": MASK_VALUE,
                 "prefill": "[1,1,SEQ,SEQ]: 0 where j <= i < len, else value",
                 "decode": "[1,1,1,SEQ+1]: 0 for history slots j < len-1 and for the last slot (the new token)"},
        "position_ids": "int32",
        "input_ids": "int32",
        "rope": "inside each block: cos/sin tables are constants gathered by position_ids",
        "decode_history": "history_k/v hold SEQ slots; write the new token's past_k/v at position len-1",
        "final_norm": "lm_head",  # or "last_block": the last layer's blocks end with it, lm_head is the product
    })
    # which export contract the graphs follow: "blocks" (static per-block graphs, the conventions above; the host
    # keeps the KV cache) or "engine" (one graph with a dynamic sequence that a vendor engine runs whole and
    # whose KV cache it keeps itself, e.g. MNN's LLM engine; its conventions are the engine's)
    contract: str = "blocks"
    source: dict = field(default_factory=dict)  # patched model dir, its surgery.json hashes
    # VL models: the `vision` graph's image preprocessing, patch layout and vision token ids
    # (export/vision_record.py); None for text-only models
    vision: dict | None = None
    versions: dict = field(default_factory=dict)
    schema: int = SCHEMA

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise SurgeryError(f"manifest has no graph {name!r}; re-run `surgery export`")

    def require_numpy_dtype(self, what: str) -> None:
        """numpy (and so onnxruntime's Python API) has no bfloat16 tensors."""
        if self.dtype == "bf16":
            raise SurgeryError(f"{what} feeds graphs from numpy, which has no bfloat16; export with --dtype fp32 "
                               "or fp16 to check or run on the CPU")

    def write(self, directory: Path) -> None:
        atomic_write_json(directory / MANIFEST, asdict(self))

    @classmethod
    def read(cls, directory: Path, check: bool = True) -> Manifest:
        """The manifest of `directory`. With `check` (always, outside the stage that is writing it) every
        file it names is checked before anyone opens it (surgery/bundle_check.py): inside the directory,
        and graphs matching their recorded hashes."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise SurgeryError(f"{directory} has no {MANIFEST}; is it the output of `surgery export`?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["graphs"] = [GraphSpec.of(g) for g in raw["graphs"]]
            if raw.get("compiled") is not None:
                raw["compiled"] = Compiled.of(raw["compiled"])
            manifest = cls(**raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SurgeryError(f"{path} is not a valid manifest ({type(exc).__name__}); re-run `surgery export`"
                               ) from None
        if check:
            from surgery.bundle_check import check_files

            check_files(Path(directory), manifest)
        return manifest
