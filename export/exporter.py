"""`surgery export`: a patched model directory -> static per-block ONNX graphs + manifest.json.

Each graph is written to a temp file and renamed; `.export-state.json` remembers finished graphs (with the
hash of the file and of what produced it), so an interrupted export resumes and ends with the same files.
The manifest is written last: a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from surgery.apply import RECORD, tool_versions
from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec, spec_for
from surgery.export.blocks import Decode, Embedding, GreedyHead, LmHead, PenaltySampleHead, Prefill
from surgery.export.weights import Resident, SafetensorsIndex, parameters_on_meta
from surgery.fsutil import STAGING_PREFIX, atomic_write_json, sha256_file, sha256_text
from surgery.manifest import GraphSpec, Manifest, TensorSpec

STATE = ".export-state.json"
EMBEDDING_FILE = "embedding.bin"
EXTERNAL_DATA_ABOVE = 512 << 20  # bytes: weights (and graphs) above this live in <graph>.onnx.data
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "qwen.tiktoken", "tokenization_qwen.py", "generation_config.json")
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


def check_source(model_dir: Path, options: ExportOptions) -> dict:
    """Preflight a directory written by `surgery apply`; return its config (nothing is loaded or run)."""
    record_path = model_dir / RECORD
    if not model_dir.is_dir() or not record_path.is_file():
        raise SurgeryError(f"{model_dir} was not produced by `surgery apply`; run `surgery apply <pack> "
                           f"--model {model_dir}` first and export its output")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("auto_map") and not options.trust_remote_code:
        raise SurgeryError(f"{model_dir} runs its own modeling code (auto_map); pass --trust-remote-code "
                           "if you trust it")
    if spec_for(str(config.get("model_type"))) is None:
        raise SurgeryError(f"export has no spec for model_type {config.get('model_type')!r}; "
                           "is there a pack for it (`surgery list`)?")
    check_weights(model_dir)
    return config


def _loading(model_dir: Path, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    try:
        return build().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"cannot load {model_dir}: {first}; check the weights files") from None


def load_full(model_dir: Path, options: ExportOptions) -> tuple[torch.nn.Module, dict]:
    """The whole model in memory (what per-model export scripts do; kept for comparison in bench/)."""
    config = check_source(model_dir, options)
    from transformers import AutoModelForCausalLM

    model = _loading(model_dir, lambda: AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=options.trust_remote_code, dtype=DTYPES[options.dtype]))
    return model, config


def load_streaming(model_dir: Path, options: ExportOptions) -> tuple[Resident, dict]:
    """A parameter-less skeleton plus a loader that holds one module's weights at a time."""
    config = check_source(model_dir, options)
    from transformers import AutoConfig, AutoModelForCausalLM

    def build() -> torch.nn.Module:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=options.trust_remote_code)
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=options.trust_remote_code,
                                                    dtype=DTYPES[options.dtype])

    model = _loading(model_dir, build)
    spec = spec_for(config["model_type"])
    aliases = ({f"{spec.lm_head}.weight": f"{spec.embedding}.weight"}
               if config.get("tie_word_embeddings") else {})
    return Resident(model, SafetensorsIndex(model_dir), DTYPES[options.dtype], aliases), config


def check_weights(model_dir: Path) -> None:
    """Fail early, in one line, on missing, dangling or corrupt safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SurgeryError(f"{model_dir} has no *.safetensors weights; copy or link them in (or re-run apply)")
    for path in files:
        if not path.exists():
            raise SurgeryError(f"{path.name} links to {path.resolve()}, which is missing; restore the weights")
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise SurgeryError(f"{path.name} is not a readable safetensors file ({exc}); re-download it") from None


def plan_jobs(model: torch.nn.Module, spec: ArchSpec, options: ExportOptions) -> list[Job]:
    cfg = model.config
    seq, hidden, dtype = options.seq_length, cfg.hidden_size, DTYPES[options.dtype]
    kv, hd = spec.num_kv_heads(cfg), spec.head_dim(cfg)
    layers = spec.part(model, spec.layers)
    chosen = range(len(layers)) if options.blocks is None else options.blocks
    cos, sin = spec.rope_tables(model, seq)
    wte = spec.part(model, spec.embedding)
    ids = torch.zeros(1, seq, dtype=torch.int32)
    mask = torch.full((seq, seq), -10000.0).triu(1)[None, None].to(dtype)
    states = torch.randn(1, seq, hidden, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq, dtype=torch.int32)[None]
    jobs = [] if options.embedding_disk else [
        Job("embedding", "embedding", Embedding(wte), {"input_ids": ids}, ["input_states"],
            needs=(spec.embedding,)),
        Job("embedding_cache", "embedding_cache", Embedding(wte), {"input_ids": ids[:, :1]}, ["input_states"],
            needs=(spec.embedding,)),
    ]
    # two distinct tensors: torch.export merges inputs that are the same object into one graph input
    history_k, history_v = torch.randn(2, 1, seq, kv, hd, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for i in chosen:
        jobs.append(Job(f"block_{i}", "block", Prefill(spec, layers[i], cos, sin),
                        {"input_states": states, "position_ids": pos, "attention_mask": mask},
                        ["hidden_states", "past_k", "past_v"], layer=i, needs=(f"{spec.layers}.{i}",)))
        jobs.append(Job(f"block_cache_{i}", "block_cache", Decode(spec, layers[i], cos, sin),
                        {"input_states": states[:, :1], "position_ids": pos[:, :1],
                         "attention_mask": torch.zeros(1, 1, 1, seq + 1, dtype=dtype),
                         "history_k": history_k, "history_v": history_v},
                        ["hidden_states", "past_k", "past_v"], layer=i, needs=(f"{spec.layers}.{i}",)))
    head = LmHead(spec.part(model, spec.final_norm), spec.part(model, spec.lm_head))
    jobs.append(Job("lm_head", "lm_head", head, {"hidden_states": states[0, :1]}, ["m_logits"],
                    needs=(spec.final_norm, spec.lm_head)))
    jobs.append(Job("greedy_head", "greedy_head", GreedyHead(),
                    {"m_logits": torch.randn(1, cfg.vocab_size, dtype=dtype)}, ["token"]))
    jobs.append(Job("penalty_sample_head", "penalty_sample_head", PenaltySampleHead(),
                    {"m_logits": torch.randn(1, cfg.vocab_size, dtype=dtype), "input_ids": ids,
                     "top_p": torch.tensor([0.8]), "temperature": torch.tensor([0.7]),
                     "penalty": torch.tensor([1.1])}, ["probs", "tokens"]))
    return jobs


def _np_dtype(t: torch.Tensor) -> str:
    return "bfloat16" if t.dtype == torch.bfloat16 else str(t.detach().numpy().dtype)


def data_file(path: Path) -> Path:
    """Where a graph's weights go when they are stored outside the .onnx file."""
    return path.with_name(path.name + ".data")


class _ParamsAsInputs(torch.nn.Module):
    """Calls `module` with the named parameters taken from trailing inputs, so the exporter sees them as
    graph inputs and never copies them (the TorchScript exporter holds several copies of every weight)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.slots = [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in names]

    def forward(self, *args: torch.Tensor):
        n = len(args) - len(self.slots)
        saved = [owner._parameters[leaf] for owner, leaf in self.slots]
        try:
            for (owner, leaf), tensor in zip(self.slots, args[n:], strict=True):
                owner._parameters[leaf] = tensor  # a plain tensor for the trace; restored below
            return self.module(*args[:n])
        finally:
            for (owner, leaf), param in zip(self.slots, saved, strict=True):
                owner._parameters[leaf] = param


def _inputs_to_external(model: onnx.ModelProto, tensors: dict[str, torch.Tensor], data: Path) -> None:
    """Turn graph inputs into initializers whose bytes are written to `data` straight from torch memory."""
    offset = 0
    with open(data, "wb") as fh:
        for name, tensor in tensors.items():
            tensor = tensor.detach().contiguous()
            if tensor.dtype == torch.bfloat16:
                array, dtype = tensor.view(torch.int16).numpy(), onnx.TensorProto.BFLOAT16
            else:
                array = tensor.numpy()
                dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            fh.write(memoryview(array).cast("B"))
            init = onnx.TensorProto(name=name, data_type=dtype, dims=array.shape,
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            model.graph.initializer.append(init)
            offset += array.nbytes
    kept = [i for i in model.graph.input if i.name not in tensors]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def export_job(job: Job, path: Path, opset: int, external_above: int = EXTERNAL_DATA_ABOVE,
               exporter: str = "torchscript") -> list[TensorSpec]:
    """Export one wrapper to `path` atomically; return its output specs (from a torch run).

    Weights bigger than `external_above` bytes (vocab tables) are passed to the TorchScript exporter as
    inputs and then written once, straight from memory, into `<name>.onnx.data`; a whole graph over that
    size is re-saved with its weights there too (protobuf caps a file at 2 GiB). The data file is moved
    into place before the graph.
    """
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{path.stem}-", dir=path.parent))
    data = data_file(path)
    try:
        tmp = stage / path.name
        big = ({name: p for name, p in job.module.named_parameters() if p.numel() * p.element_size() > external_above}
               if exporter == "torchscript" else {})
        module = _ParamsAsInputs(job.module, list(big)) if big else job.module
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = job.module(*job.inputs.values())
            outs = outs if isinstance(outs, tuple) else (outs,)
            args = (module, (*job.inputs.values(), *big.values()), str(tmp))
            names = {"input_names": [*job.inputs, *big], "output_names": job.outputs, "opset_version": opset}
            if exporter == "dynamo":
                torch.onnx.export(*args, **names, dynamo=True, optimize=True, verbose=False)
            else:
                torch.onnx.export(*args, **names, dynamo=False, do_constant_folding=True)
        written = list(stage.iterdir())
        if big:
            model = onnx.load(str(tmp))
            _inputs_to_external(model, big, stage / data.name)
            onnx.save_model(model, str(tmp))
        elif len(written) > 1 or sum(f.stat().st_size for f in written) > external_above:
            model = onnx.load(str(tmp))  # also reads any per-tensor files the exporter wrote
            for extra in written:
                extra.unlink()
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            del model
        if (stage / data.name).exists():
            os.replace(stage / data.name, data)
        elif data.exists():
            data.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [TensorSpec(n, list(o.shape), _np_dtype(o)) for n, o in zip(job.outputs, outs, strict=True)]


def export_model(model_dir: Path, out: Path, options: ExportOptions,
                 progress: Callable[[str], None] = lambda name: None) -> Manifest:
    """Export every graph of the block contract; resumes from `.export-state.json`."""
    model_dir = Path(model_dir)
    resident, config = load_streaming(model_dir, options)
    model = resident.model
    spec = spec_for(config["model_type"])
    n_layers = len(spec.part(model, spec.layers))
    if options.blocks is not None and any(not 0 <= b < n_layers for b in options.blocks):
        raise SurgeryError(f"--blocks {','.join(map(str, options.blocks))} is out of range: the model has "
                           f"{n_layers} layers (0-{n_layers - 1})")
    record = json.loads((model_dir / RECORD).read_text())
    key = sha256_text(json.dumps({"options": asdict(options), "source": record["hashes"],
                                  "weights": _weights_fingerprint(model_dir)}, sort_keys=True))
    out.mkdir(parents=True, exist_ok=True)
    clean_interrupted(out)
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("key") != key:
        state = {"key": key, "graphs": {}}
    graphs = []
    for job in plan_jobs(model, spec, options):
        path = out / f"{job.name}.onnx"
        done = state["graphs"].get(job.name)
        if not (done and _hashes(path) == done["hashes"]):
            progress(job.name)
            resident.hold(job.needs)
            outputs = export_job(job, path, options.opset, options.external_data_above, options.exporter)
            done = {"hashes": _hashes(path), "outputs": [asdict(o) for o in outputs]}
            state["graphs"][job.name] = done
            atomic_write_json(state_path, state)
        inputs = [TensorSpec(n, list(t.shape), _np_dtype(t)) for n, t in job.inputs.items()]
        data = data_file(path)
        graphs.append(GraphSpec(job.name, path.name, job.kind, inputs, [TensorSpec.of(o) for o in done["outputs"]],
                                done["hashes"][path.name], job.layer,
                                data_file=data.name if data.exists() else None))
    embedding_file = None
    if options.embedding_disk:
        path = out / EMBEDDING_FILE
        done = state["graphs"].get(EMBEDDING_FILE)
        if not (done and _hashes(path) == done["hashes"]):
            progress(EMBEDDING_FILE)
            resident.hold([spec.embedding])
            write_bf16_table(spec.part(model, spec.embedding).weight, path)
            state["graphs"][EMBEDDING_FILE] = {"hashes": _hashes(path)}
            atomic_write_json(state_path, state)
        embedding_file = {"file": EMBEDDING_FILE, "dtype": "bfloat16", "rounding": "nearest-even",
                          "shape": [model.config.vocab_size, model.config.hidden_size],
                          "sha256": _hashes(path)[EMBEDDING_FILE]}
    resident.hold([])
    tokenizer = _copy_tokenizer(model_dir, out)
    cfg = model.config
    manifest = Manifest(
        model_type=config["model_type"], architecture=(config.get("architectures") or ["?"])[0],
        seq_length=options.seq_length, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=spec.num_kv_heads(cfg), head_dim=spec.head_dim(cfg), num_layers=n_layers,
        vocab_size=cfg.vocab_size, dtype=options.dtype, opset=max(_opset(out / g.file) for g in graphs),
        exporter=options.exporter,
        graphs=graphs, bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        chat_template=tokenizer.get("chat_template"), tokenizer_files=tokenizer["files"],
        embedding_file=embedding_file,
        source={"model_dir": str(model_dir.resolve()), "pack": record["pack"], "hashes": record["hashes"]},
        versions=tool_versions() | {"onnx": _version("onnx"), "onnxruntime": _version("onnxruntime")},
    )
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


def write_bf16_table(weight: torch.Tensor, path: Path, rows: int = 8192) -> None:
    """The embedding table as raw little-endian bf16, rounded to nearest even (not truncated), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        for start in range(0, weight.shape[0], rows):
            chunk = weight[start:start + rows].detach().to(torch.bfloat16).contiguous()
            fh.write(chunk.view(torch.int16).numpy().astype("<i2").tobytes())
    os.replace(tmp, path)


def _opset(path: Path) -> int:
    """The default-domain opset a graph was really written with (dynamo may raise the one asked for)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _hashes(path: Path) -> dict[str, str] | None:
    """sha256 of a graph file and of its external data file, if any; None when the graph is missing."""
    if not path.is_file():
        return None
    return {p.name: sha256_file(p) for p in (path, data_file(path)) if p.is_file()}


def _weights_fingerprint(model_dir: Path) -> dict[str, list[int]]:
    """Size and mtime of each weights file: cheap, and changes when the weights do."""
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(model_dir.glob("*.safetensors"))}


def _version(dist: str) -> str:
    from importlib import metadata

    return metadata.version(dist)


SAMPLING = {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1}
DECODE_POSITION = 6  # parity inputs for decode graphs: a token at position 6 with 6 valid history slots


def random_inputs(graph: GraphSpec, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that follow the contract: ids in range, positions in order, a causal or decode mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph.inputs:
        if t.name == "input_ids":
            value = rng.integers(0, vocab, t.shape)
        elif t.name in SAMPLING:
            value = np.full(t.shape, SAMPLING[t.name])
        elif t.name == "position_ids":
            value = np.arange(t.shape[-1])[None] if graph.kind == "block" else np.full(t.shape, DECODE_POSITION)
        elif t.name == "attention_mask" and graph.kind == "block":
            value = np.triu(np.full(t.shape[-2:], -10000.0), 1)[None, None]
        elif t.name == "attention_mask":
            slots = np.arange(t.shape[-1])
            value = np.where((slots < DECODE_POSITION) | (slots == t.shape[-1] - 1), 0.0, -10000.0)[None, None, None]
        else:
            value = rng.standard_normal(t.shape)
        feeds[t.name] = value.astype(t.dtype)
    return feeds
