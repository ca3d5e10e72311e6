"""MNN adapter. By default the layout MNN's own LLM engine loads (`MNN.llm.create(config.json)`): one
`llm.mnn` graph with the KV cache inside MNN's Attention ops, its configs, embedding and tokenizer files,
built from the export's patched model (compile/mnn_llm.py; docs/mnn-llm.md), its logits checked against the
exported graphs on onnxruntime. With `--layout graphs`: every graph of the export -> its own `.mnn`, each
checked against onnxruntime on the same inputs (mnn_runtime.py runs them with our generation loop).
Weight quantization (4/8-bit, per block) is MNNConvert's in both.

The converter lives in the `mnn` toolchain environment and runs as a subprocess (`mnn_worker.py`); nothing
here imports MNN, so MNN's telemetry, which pip-installs a package when its Python tools are imported,
never runs.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from surgery.checks import DELTA, check_graph, sampled
from surgery.compile.base import QUANTIZATIONS, Adapter, CompileOptions, copy_host_files, finish, prepare
from surgery.compile.logged import parallel, run_logged
from surgery.compile.mnn_llm import LORA
from surgery.compile.mnn_runtime import WORKER, MnnLlm, MnnModel
from surgery.compile.toolchains import installed, python_of
from surgery.errors import SurgeryError
from surgery.fsutil import STAGING_PREFIX, sha256_file
from surgery.manifest import Compiled, GraphSpec, Manifest, TensorSpec
from surgery.outputs import Output
from surgery.parity import Parity

QUANTIZED_KINDS = {"block", "block_cache", "lm_head"}
# cosine floors per output, by weight bits (None: float weights), and for what a block adds to its input
MIN_COSINE = {None: 0.9999, 8: 0.99, 4: 0.95}
MIN_DELTA = {None: 0.999, 8: 0.95, 4: 0.8}
# the engine layout is checked end to end (logits after every layer, from the engine's own embedding), where
# quantization error adds up: the tiny fixture (random weights, init 0.2) measures 0.99999 float, 0.9993 at
# 8-bit, 0.93 at 4-bit block 32 and 0.90 with the 4-bit head as the embedding; a broken graph is far below
MIN_LOGITS_COSINE = {None: 0.9999, 8: 0.98, 4: 0.85}


def convert_args(graph: GraphSpec, src: Path, dst: Path, bits: int | None, block: int) -> list[str]:
    args = ["-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(dst), "--bizCode", "surgery"]
    if bits and graph.kind in QUANTIZED_KINDS:
        args += ["--weightQuantBits", str(bits), "--weightQuantBlock", str(block)]
    if graph.kind in ("embedding", "embedding_cache"):
        args += ["--fp16"]  # the table in half precision (weight quantization skips Gather): half the size
    return args


def weight_bits(quantize: str) -> int | None:
    """MNN weight quantization from a `-q` mode: w4* 4-bit, w8* 8-bit, anything else float."""
    return 4 if quantize.startswith("w4") else 8 if quantize.startswith("w8") else None


class MnnAdapter(Adapter):
    name = "mnn"
    chips = ("mnn",)
    summary = "MNN (CPU/GPU/NPU backends of phones and boards): MNN's LLM engine layout (llm.mnn + configs)"
    toolchain = "mnn"
    backend = "mnn"
    runtime = "surgery.compile.mnn_runtime:open_mnn"
    loaded_by = "MNN's LLM engine (MNN.llm.create(config.json), llm_demo); --layout graphs: MNN's Module API"
    quantizations = ("fp32", *QUANTIZATIONS)
    layouts = ("runtime", "graphs")

    def compiles_graphs(self, options: CompileOptions) -> bool:
        return options.layout == "graphs"  # the engine graph is traced from the patched model

    def target(self, chip: str) -> str:
        return "mnn"

    def validate_lora(self, options: CompileOptions) -> None:
        """The adapter's own model (compile/mnn_lora.py) adds its branches to the engine graph's linears, which
        are ours by name only when surgery writes them: the engine layout at 4/8 bits."""
        if options.layout != "runtime" or weight_bits(options.quantize) is None:
            raise SurgeryError("--lora-mode separate with -c mnn needs the engine layout (--layout runtime) and 4- or "
                               "8-bit weights (-q w4*/w8*): the adapter's model is the engine graph plus the "
                               "adapter's branches, reusing the base model's quantized linears by name")

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor: object = None) -> Manifest:
        self.local_only(executor, self.name)
        onnx_dir, out, manifest, owned = prepare(self, onnx_dir, out, options)
        manifest.require_numpy_dtype("surgery compile --chip mnn")
        for stale in out.glob(f"{STAGING_PREFIX}*"):  # what a killed run left
            shutil.rmtree(stale, ignore_errors=True)
        if options.layout == "runtime":
            return self.compile_llm(onnx_dir, out, manifest, owned, options)
        bits, block, python = weight_bits(options.quantize), options.group_size, python_of("mnn")
        owned.add("logs/", *(f"{g.name}.mnn" for g in manifest.graphs))
        logs = out / "logs"

        def convert(graph: GraphSpec) -> GraphSpec:
            dst, tmp, log = out / f"{graph.name}.mnn", out / f".{graph.name}.mnn.tmp", logs / f"{graph.name}.log"
            start = log.stat().st_size if log.is_file() else 0
            # MNNConvert spills every weight of >= 64K elements to `./.__convert_external_data.bin` (a fixed name
            # in its cwd), reads it back and deletes it: concurrent conversions must not share a cwd
            scratch = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{graph.name}-convert-", dir=out))
            try:
                run_logged([str(python), str(WORKER), "convert", *convert_args(graph, onnx_dir / graph.file, tmp,
                                                                                bits, block)],
                           log, f"MNNConvert of graph {graph.name}", cwd=scratch, expect=tmp)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            with open(log, "rb") as fh:
                fh.seek(start)
                if b"Can't open file" in fh.read():  # a lost spill file: the converter still says success
                    tmp.unlink(missing_ok=True)
                    raise SurgeryError(f"MNNConvert of graph {graph.name} lost its weights (see {log})")
            tmp.replace(dst)
            return replace(graph, file=dst.name, sha256=sha256_file(dst), data_file=None, data_sha256=None)

        graphs = parallel(convert, manifest.graphs, options.jobs)
        copy_host_files(onnx_dir, out, manifest)
        compiled = replace(manifest, graphs=graphs, backend="mnn")
        compiled.compiled = Compiled(
            adapter=self.name, chip="mnn", options=vars(options),
            toolchain={"mnn": installed("mnn")["versions"].get("mnn")}, files=[g.file for g in graphs],
            check=options.check, details={
                "layout": "graphs", "weight_quant_bits": bits, "weight_quant_block": block if bits else None,
                "commands": {g.name: ["MNNConvert", *convert_args(g, onnx_dir / g.file, out / f"{g.name}.mnn", bits,
                                                                   block)] for g in manifest.graphs}})
        compiled.write(out)
        rows = check_against_onnx(onnx_dir, out, sampled(manifest, options.check, costly=True))
        # token indices are compared for the record only: equal logits (ties) may be ordered either way
        return finish(out, compiled, rows, {DELTA: MIN_DELTA[bits]}, MIN_COSINE[bits],
                      f"MNN with {bits or 'float'} weights")


    def compile_llm(self, onnx_dir: Path, out: Path, manifest: Manifest, owned: Output,
                    options: CompileOptions) -> Manifest:
        """MNN's LLM engine layout from the export's patched model (compile/mnn_llm.py)."""
        from surgery.compile import mnn_llm as L
        from surgery.export.source import export_spec_for

        if manifest.vision is not None:
            raise SurgeryError(vision_refusal(manifest))
        bits, block = weight_bits(options.quantize), options.group_size
        model_dir = Path(manifest.source.get("model_dir", ""))
        if not (model_dir / "config.json").is_file():
            raise SurgeryError(f"the export's patched model {model_dir} is gone; MNN's engine layout is built from "
                               "it (re-run `surgery apply`, or compile with --layout graphs)")
        lora = Path(options.lora) if options.lora else None  # --lora-mode separate: lora.mnn beside llm.mnn
        owned.add("logs/", L.MODEL, L.WEIGHT, L.EMBEDDING, L.TOKENIZER, L.CONFIG, L.LLM_CONFIG,
                  *([LORA] if lora else []))
        log = out / "logs" / "llm.log"
        log.unlink(missing_ok=True)
        built = L.build_model(model_dir, out, python_of("mnn"), log, bits, block, options.symmetric, lora)
        tie = built["tie_embeddings"]
        (out / L.EMBEDDING).unlink(missing_ok=True)
        if tie is None:
            key = f"{export_spec_for(manifest.model_type).embedding}.weight"
            L.write_embedding(model_dir, out, key, (built["vocab_size"], built["hidden_size"]))
        copy_host_files(onnx_dir, out, manifest)
        L.write_tokenizer(out, manifest)
        L.write_configs(out, manifest, built, bits is not None, tie)
        h, f32, i32 = built["hidden_size"], "float32", "int32"
        graph = GraphSpec("llm", L.MODEL, "llm", [TensorSpec("input_ids", [-1, 1, h], f32),
                                                  TensorSpec("attention_mask", [], f32),
                                                  TensorSpec("position_ids", [1, -1], i32),
                                                  TensorSpec("logits_index", [1], i32)],
                          [TensorSpec("logits", [1, -1, built["vocab_size"]], f32)], sha256_file(out / L.MODEL),
                          data_file=L.WEIGHT, data_sha256=sha256_file(out / L.WEIGHT))
        files = [L.CONFIG, L.LLM_CONFIG, L.MODEL, L.WEIGHT, L.TOKENIZER, *([L.EMBEDDING] if tie is None else []),
                 *([LORA] if lora else [])]
        conventions = {"input_ids": "the embeddings, float [seq, 1, hidden] (the engine looks them up)",
                       "attention_mask": "the engine's: a scalar 0 on CPU, causality from its KV metadata",
                       "position_ids": "int32 [1, seq]", "logits_index": "int32 [1]: the position whose logits",
                       "kv_cache": "inside MNN's Attention op, kept by the engine", "final_norm": "llm"}
        compiled = replace(manifest, graphs=[graph], backend="mnn", contract="engine", conventions=conventions)
        compiled.compiled = Compiled(
            adapter=self.name, chip="mnn", options=vars(options),
            toolchain={"mnn": installed("mnn")["versions"].get("mnn")}, files=files, check=options.check,
            details={"layout": "llm", "loaded_by": "MNN.llm.create(config.json)", "weight_quant_bits": bits,
                     "weight_quant_block": block if bits else None, "tie_embeddings": tie,
                     "linear_weights_written_by": built["linear_weights"],
                     "checkpoint_codes": built["checkpoint_codes"],  # linears stored with a GPTQ/AWQ's own codes
                     "commands": built["commands"], **({"lora": built["lora"]} if lora else {})})
        compiled.write(out)
        rows = check_llm(model_dir, out, built["vocab_size"], lora) if options.check != "none" else []
        return finish(out, compiled, rows, {}, MIN_LOGITS_COSINE[bits],
                      f"MNN's LLM engine with {bits or 'float'} weights")


def check_llm(model_dir: Path, out: Path, vocab: int, lora: Path | None = None, prompt_length: int = 8) -> list[Parity]:
    """The engine's logits after a prefill against the patched model's own (export/engine_reference.py),
    same prompt, from the embedding rows the engine reads (the bf16 table's when it ships one): no exported
    graph is needed. With a separate adapter, also the engine running `lora.mnn` over the base against the
    model with the adapter merged."""
    from surgery.export.engine_reference import prefill_logits
    from surgery.parity import compare

    ids = np.random.default_rng(0).integers(0, vocab, prompt_length).tolist()
    # export already ran this model's code (the pack's patched modeling file) with the user's consent
    want = prefill_logits(model_dir, ids, trust_remote_code=True, bf16_rows=(out / "embeddings_bf16.bin").is_file())
    got = np.asarray(MnnLlm(out).engine(ids, 1)["logits"], np.float32)
    rows = [compare("llm", "logits", got, want)]
    if lora is not None:
        want = prefill_logits(model_dir, ids, trust_remote_code=True, bf16_rows=(out / "embeddings_bf16.bin").is_file(),
                              adapter=lora)
        rows.append(compare(LORA, "logits", np.asarray(MnnLlm(out).engine(ids, 1, lora=LORA)["logits"], np.float32),
                            want))
    return rows


def check_against_onnx(onnx_dir: Path, mnn_dir: Path, graphs: list[GraphSpec]) -> list[Parity]:
    """The chosen .mnn graphs against their ONNX graphs on the same inputs (compile/checks.py)."""
    if not graphs:
        return []
    compiled = MnnModel(mnn_dir)
    try:
        vocab = compiled.manifest.vocab_size
        return [row for g in graphs
                for row in check_graph(onnx_dir, g, vocab, lambda g, feeds: compiled.run(g.name, **feeds))]
    finally:
        compiled.worker.close()


def vision_refusal(manifest: Manifest) -> str:
    """Why the LLM-engine layout refuses a VL export. MNN 3.6.1's engine (the wheel) does run Qwen2-VL image
    prompts (`<img>path</img>`: `transformers/llm/engine/src/omni.cpp` at tag 3.6.1, `qwen2VisionProcess`), but
    `Omni::gen_position_ids` feeds every decode step `all_seq_len + i` in all three mrope rows, without the
    image's position delta transformers adds (MNN fixed it after 3.6.1, faf71a1: `gen_seq_len +
    mPositionIds.back() + i`), and `MropeInfo::currentIdx` resumes text after the image at start + columns
    where transformers resumes at start + max(rows, columns); it also resizes bilinearly to a square
    `image_size` where Qwen2-VL's processor resizes bicubically. Its tokens after an image would not be the
    model's, so the bundle would fail the parity bar every other bundle meets."""
    if manifest.conventions.get("mrope"):
        return ("MNN's LLM engine layout cannot take this vision-language model: MNN 3.6.1's engine (omni.cpp "
                "gen_position_ids) feeds decode steps positions without Qwen2-VL's multimodal-RoPE delta, so its "
                "tokens after an image would differ from the model's; use --layout graphs (vision.mnn and the "
                "LLM's graphs, which `surgery run --image` runs)")
    return ("MNN's LLM engine layout has no vision tower (visual.mnn) for this vision-language model yet; use "
            "--layout graphs (vision.mnn and the LLM's graphs, which `surgery run --image` runs)")


ADAPTER = MnnAdapter()
