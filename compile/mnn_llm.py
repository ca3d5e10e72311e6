"""MNN's LLM engine layout (what `llmexport` writes and `MNN.llm.create(config.json)` loads), from our model.

Files, and the engine rule each satisfies (docs/mnn-llm.md cites the MNN sources):
- `llm.mnn` + `llm.mnn.weight`: the one engine graph (export/engine.py), converted with MNNConvert. Its
  `LlmExporter::FusedAttention` nodes come out as `Extra` ops; they are rewritten into MNN `Attention` ops
  (`AttentionParam{kv_cache, layer_index}`, which keep the KV cache inside the engine) in the JSON form of
  the model. Weights are saved external first, so that JSON holds structure only (no weights as text).
- `embeddings_bf16.bin`: raw bf16 [vocab, hidden] the engine reads rows of (DiskEmbedding), streamed from the
  checkpoint; or, for a tied head with 4/8-bit weights, nothing: `tie_embeddings` points the engine at the
  head's quantized rows inside `llm.mnn.weight` (compile/mnn_tie.py).
- `tokenizer.txt` (compile/mnn_tokenizer.py), `config.json` and `llm_config.json` (the keys llmconfig.hpp reads).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from surgery.compile.logged import run_logged
from surgery.compile.mnn_runtime import WORKER
from surgery.compile.mnn_tokenizer import stop_token_ids, tokenizer_text
from surgery.errors import SurgeryError
from surgery.fsutil import STAGING_PREFIX, atomic_write_json
from surgery.manifest import Manifest

MODEL, WEIGHT, EMBEDDING, TOKENIZER = "llm.mnn", "llm.mnn.weight", "embeddings_bf16.bin", "tokenizer.txt"
LORA = "lora.mnn"  # --lora-mode separate: the adapter's model over the base (compile/mnn_lora.py)
CONFIG, LLM_CONFIG = "config.json", "llm_config.json"


def convert_steps(onnx: Path, stage: Path, bits: int | None, block: int, symmetric: bool) -> list[list[str]]:
    """MNNConvert argument lists: ONNX -> MNN (weights external, quantized), MNN -> JSON; then (after the
    Attention rewrite) JSON -> MNN."""
    quant = ["--weightQuantBits", str(bits), "--weightQuantBlock", str(block)] if bits else []
    if bits and symmetric:
        quant.append("--weightQuantAsymmetric=0")
    return [["-f", "ONNX", "--modelFile", str(onnx), "--MNNModel", str(stage / "stage.mnn"), "--allowCustomOp",
             "--transformerFuse", "--saveExternalData", "--bizCode", "surgery", *quant],
            ["-f", "MNN", "--modelFile", str(stage / "stage.mnn"), "--JsonFile", str(stage / "stage.json")],
            ["-f", "JSON", "--modelFile", str(stage / "stage.json"), "--MNNModel", str(stage / MODEL),
             "--bizCode", "surgery"]]


def attention_ops(graph: dict) -> int:
    """Each `Extra(FusedAttention)` becomes `Attention` with `AttentionParam` (schema/default/MNN.fbs), in
    place; returns how many."""
    count = 0
    for op in graph["oplists"]:
        main = op.get("main") or {}
        if op.get("type") == "Extra" and main.get("type") == "FusedAttention":
            attrs = {a["key"]: a for a in main.get("attr", [])}
            op["type"], op["main_type"] = "Attention", "AttentionParam"
            op["main"] = {"kv_cache": bool(attrs["kv_cache"]["i"]), "layer_index": attrs["layer_index"]["i"],
                          "kv_shared_layer_index": attrs["kv_shared_layer_index"]["i"]}
            count += 1
    return count


def build_model(model_dir: Path, out: Path, python: Path, log: Path, bits: int | None, block: int,
                symmetric: bool, lora: Path | None = None) -> dict:
    """`out/llm.mnn` + `out/llm.mnn.weight` from the patched model; returns the graph facts, the
    `tie_embeddings` entry (None: ship the bf16 table) and the commands. With quantized weights MNNConvert
    sees the graph without its linears' weights, which compile/mnn_weights.py then writes one layer at a
    time: memory stays one layer's, whatever the depth (MNNConvert held the whole graph twice). `lora`: an
    adapter written as `out/lora.mnn`, the same graph plus its branches (compile/mnn_lora.py)."""
    from surgery.export.engine import export_engine_graph

    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}llm-", dir=out))
    weights, kept = None, []
    try:
        # export already ran this model's code (the pack's patched modeling file) with the user's consent
        facts, weights = export_engine_graph(model_dir, stage / "llm.onnx", trust_remote_code=True,
                                             weightless=bits is not None)
        steps = convert_steps(stage / "llm.onnx", stage, None if weights else bits, block, symmetric)
        for args, made in zip(steps[:2], ("stage.mnn", "stage.json"), strict=True):
            run_logged([str(python), str(WORKER), "convert", *args], log, f"MNNConvert ({made})", cwd=stage,
                       expect=stage / made)
        if b"Can't open file" in log.read_bytes():
            raise SurgeryError(f"MNNConvert lost the engine graph's weights (see {log})")
        graph = json.loads((stage / "stage.json").read_text())
        fused = attention_ops(graph)
        if fused != facts["layer_nums"]:
            raise SurgeryError(f"MNNConvert kept {fused} FusedAttention nodes of {facts['layer_nums']} layers "
                               f"(see {log})")
        if weights is not None:
            from surgery.compile.mnn_codes import CheckpointCodes
            from surgery.compile.mnn_weights import write_linears

            (stage / "stage.mnn.weight").touch()  # absent when the rest of the graph had no external weights
            own = CheckpointCodes(weights)  # a GPTQ/AWQ checkpoint's codes go in as they are
            write_linears(graph, stage / "stage.mnn.weight", weights, bits, block, symmetric, codes=own)
            kept = own.used
            weights.close()
        tie = None
        if bits and facts["tie_word_embeddings"]:  # the head's rows as the embedding (compile/mnn_tie.py)
            from surgery.compile import mnn_tie

            tie = mnn_tie.tie_embeddings(graph, stage / "stage.mnn.weight", facts["vocab_size"],
                                         facts["hidden_size"], bits, block)
        (stage / "stage.json").write_text(json.dumps(graph))
        run_logged([str(python), str(WORKER), "convert", *steps[2]], log, "MNNConvert (llm.mnn)", cwd=stage,
                   expect=stage / MODEL)
        adapter = _write_lora(graph, weights, lora, stage, python, log) if lora is not None else None
        os.replace(stage / "stage.mnn.weight", out / WEIGHT)  # the JSON kept its offsets into this file
        os.replace(stage / MODEL, out / MODEL)
        if adapter is not None:
            os.replace(stage / LORA, out / LORA)
        return {**facts, "lora": adapter, "tie_embeddings": tie, "commands": [["MNNConvert", *a] for a in steps],
                "linear_weights": "surgery (compile/mnn_weights.py)" if weights else "MNNConvert",
                "checkpoint_codes": kept}
    finally:
        if weights is not None:
            weights.close()
        shutil.rmtree(stage, ignore_errors=True)


def _write_lora(graph: dict, weights, lora: Path, stage: Path, python: Path, log: Path) -> dict:
    """`stage/lora.mnn` from the final engine graph and the adapter; returns what the manifest records."""
    from surgery.compile.mnn_lora import engine_names, lora_graph
    from surgery.export.lora import read_adapter

    adapter = read_adapter(lora)
    (stage / "lora.json").write_text(json.dumps(lora_graph(graph, adapter, engine_names(weights))))
    run_logged([str(python), str(WORKER), "convert", "-f", "JSON", "--modelFile", str(stage / "lora.json"),
                "--MNNModel", str(stage / LORA), "--bizCode", "surgery"], log, "MNNConvert (lora.mnn)", cwd=stage,
               expect=stage / LORA)
    return {"file": LORA, **adapter.summary(),
            "loaded_by": f"Llm::create_lora(\"{LORA}\") over the loaded base model (Python: model._c_obj.create_lora)"}


def write_embedding(model_dir: Path, out: Path, key: str, shape: tuple[int, int]) -> None:
    """Raw bf16 [vocab, hidden], the engine's default embedding file, streamed chunk by chunk."""
    import torch

    from surgery.export.tables import Table, write_table
    from surgery.export.weights import SafetensorsIndex

    write_table(SafetensorsIndex(model_dir), Table(key, EMBEDDING, torch.bfloat16, shape), out)


def write_configs(out: Path, manifest: Manifest, facts: dict, quantized: bool, tie: list[int] | None) -> None:
    """config.json (runtime settings; file names at their defaults, spelled out) and llm_config.json (the
    model facts), merged by the engine (llmconfig.hpp)."""
    config = {"llm_model": MODEL, "llm_weight": WEIGHT, "tokenizer_file": TOKENIZER, "backend_type": "cpu",
              "thread_num": 4, "precision": "low" if quantized else "high", "memory": "low" if quantized else "high",
              "sampler_type": "greedy"}
    if tie is None:
        config["embedding_file"] = EMBEDDING
    llm = {"model_type": facts["model_type"], "hidden_size": facts["hidden_size"], "layer_nums": facts["layer_nums"],
           "attention_mask": "float", "attention_type": "full", "is_mrope": False}
    template = manifest.chat_template or facts.get("chat_template")  # the tokenizer's, else the pack's
    if template:
        stops = manifest.tokenizer_files and _eos_name(out)
        llm["jinja"] = {"chat_template": template, **({"eos": stops} if stops else {})}
    if tie is not None:
        llm["tie_embeddings"] = tie
    atomic_write_json(out / CONFIG, config)
    atomic_write_json(out / LLM_CONFIG, llm)


def _eos_name(directory: Path) -> str | None:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    name = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    return name.get("content") if isinstance(name, dict) else name


def write_tokenizer(out: Path, manifest: Manifest) -> None:
    prefix = [manifest.bos_token_id] if isinstance(manifest.bos_token_id, int) and _adds_bos(out) else []
    text = tokenizer_text(out, stop_token_ids(out, manifest.eos_token_id), prefix)
    tmp = out / f".{TOKENIZER}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / TOKENIZER)


def _adds_bos(directory: Path) -> bool:
    path = directory / "tokenizer_config.json"
    return path.is_file() and bool(json.loads(path.read_text(encoding="utf-8")).get("add_bos_token"))
