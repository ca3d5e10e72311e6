"""Commands on exported graphs: export, verify, run, optimize, passes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgery.cli.common import Dtype, Exporter, Json, OnnxDir, Trust, app, emit_json, err, ids, out, progress
from surgery.errors import SurgeryError


def parse_blocks(text: str | None) -> tuple[int, ...] | None:
    """`0-3` or `0,2,5` (or a mix) -> layer indices."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise SurgeryError(f"--blocks {text!r} is not a layer list; write e.g. 0-3 or 0,2,5")
        lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if hi < lo:
            raise SurgeryError(f"--blocks range {part.strip()} runs backwards; write {hi}-{lo}")
        layers += range(lo, hi + 1)
    return tuple(sorted(set(layers)))


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """`448` or `448x672` (height x width) -> (height, width)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if match is None:
        raise SurgeryError(f"--image-size {text!r} is not a size; write e.g. 448 or 448x672 (height x width)")
    return int(match[1]), int(match[2] or match[1])


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="A directory written by `surgery apply`.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for the graphs and manifest.json.")],
    seq_length: Annotated[int, typer.Option("--seq-length", "-s", min=2, help="Static sequence length.")],
    dtype: Annotated[Dtype, typer.Option(help="Precision of the exported graphs.")] = Dtype.fp32,
    blocks: Annotated[str | None, typer.Option(help="Layers to export, e.g. 0-3 (default: all).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (vendor compilers reject newer than 17).")] = 17,
    exporter: Annotated[Exporter, typer.Option(help="torch.onnx exporter; dynamo may write opset 18.")
                        ] = Exporter.torchscript,
    embedding_disk: Annotated[bool, typer.Option("--embedding-disk", help="Write the embedding as a raw bf16 "
                                                 "table (round to nearest) for the host instead of graphs.")] = False,
    image_size: Annotated[str | None, typer.Option("--image-size", help="Vision-language models: the vision "
                                                   "graph's image size, 448 or HEIGHTxWIDTH (default 448).")] = None,
    trust_remote_code: Trust = False,
    as_json: Json = False,
) -> None:
    """Export a patched model to static per-block ONNX graphs with a manifest (resumes if interrupted).

    Example: surgery export ./Qwen-7B-Chat-surgery --out ./qwen-onnx --seq-length 512 --trust-remote-code
    """
    from surgery.export.exporter import ExportOptions, export_model

    options = ExportOptions(seq_length=seq_length, dtype=dtype.value, blocks=parse_blocks(blocks), opset=opset,
                            trust_remote_code=trust_remote_code, embedding_disk=embedding_disk,
                            exporter=exporter.value, image_size=parse_image_size(image_size))
    with progress("exporting", as_json) as report:
        manifest = export_model(model, out_dir, options, progress=report)
    if as_json:
        emit_json({"out": str(out_dir), "graphs": [g.file for g in manifest.graphs]})
        return
    out.print(f"wrote {len(manifest.graphs)} graphs (opset {manifest.opset}) and manifest.json to [bold]{out_dir}[/]")
    if manifest.opset > opset:
        err.print(f"[yellow]note:[/] the {exporter.value} exporter wrote opset {manifest.opset}; compilers that "
                  f"need {opset} want the torchscript exporter")


@app.command("verify")
def verify_cmd(
    onnx_dir: OnnxDir,
    trust_remote_code: Trust = False,
    min_cosine: Annotated[float, typer.Option(help="Fail below this cosine.")] = 0.99999,
    as_json: Json = False,
) -> None:
    """Compare every graph on onnxruntime with the patched torch module (cosine, max-abs).

    Example: surgery verify ./qwen-onnx --trust-remote-code
    """
    from surgery.export.verify import verify_export

    with progress("verifying", as_json) as report:
        rows = verify_export(onnx_dir, trust_remote_code=trust_remote_code, progress=report)
    if as_json:
        emit_json([r.as_dict() for r in rows])
    else:
        table = Table(title=f"onnxruntime vs patched torch: {onnx_dir}")
        for col in ("graph", "output", "cosine", "max abs"):
            table.add_column(col)
        for r in rows:
            style = "green" if r.cosine >= min_cosine else "red"
            table.add_row(r.graph, r.output, f"[{style}]{r.cosine:.7f}[/]", f"{r.max_abs:.2e}")
        out.print(table)
    bad = [r for r in rows if not r.cosine >= min_cosine]
    if bad:
        raise SurgeryError(f"{len(bad)} output(s) below cosine {min_cosine}, first: {bad[0].graph}/{bad[0].output} "
                           f"= {bad[0].cosine:.6f}")


@app.command("run")
def run_cmd(
    onnx_dir: OnnxDir,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (tokenized with the exported tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help="Comma-separated prompt token ids.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    image: Annotated[Path | None, typer.Option(help="VL exports and their bm1684x / MNN --layout graphs bundles: an "
                                                    "image, placed before the prompt text (or at the one image "
                                                    "token of --prompt-ids).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    backend: Annotated[str, typer.Option(help="auto (from the manifest), onnxruntime, mnn or bmodel (Sophgo, on "
                                              "the CPU simulator).")] = "auto",
    sample: Annotated[bool, typer.Option("--sample", help="Draw from the sample_head net instead of greedy.")
                      ] = False,
    top_k: Annotated[int, typer.Option(min=1, max=50, help="--sample: candidates to draw from.")] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="--sample: nucleus mass.")] = 1.0,
    temperature: Annotated[float, typer.Option(min=0.01, help="--sample: temperature.")] = 1.0,
    penalty: Annotated[float, typer.Option(min=0.01, help="--sample: repetition penalty.")] = 1.0,
    seed: Annotated[int, typer.Option(help="--sample: random seed.")] = 0,
    lora: Annotated[str | None, typer.Option("--lora", help="MNN engine bundles converted with --lora-mode "
                                             "separate: run the adapter's model (lora.mnn) over the base.")] = None,
    trust_remote_code: Trust = False,
    as_json: Json = False,
) -> None:
    """Generation the way device runtimes do it (KV cache kept as they keep it): exported graphs on
    onnxruntime, or a compiled directory on the runtime its adapter names (picked from the manifest: MNN,
    or a Sophgo bmodel through TPU-MLIR's runtime library on the CPU simulator).

    Example: surgery run ./qwen-onnx --prompt "Hello" --chat --max-new-tokens 32 --json
    VL example: surgery run ./qwen2-vl-onnx --image ./cat.png --prompt "Describe the image" --chat
    """
    from surgery.runtime import Sampling, encode_prompt, load_tokenizer, open_runtime, stop_ids

    if (prompt is None) == (prompt_ids is None):
        raise SurgeryError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    model = open_runtime(onnx_dir)
    if backend not in ("auto", model.manifest.backend):
        raise SurgeryError(f"{onnx_dir} holds {model.manifest.backend} models, not {backend}; "
                           f"compile for it first (e.g. `surgery compile {onnx_dir} --chip mnn`)")
    tokenizer = None
    if prompt is not None:
        tokenizer = load_tokenizer(onnx_dir, trust_remote_code)
        prompt_tokens = encode_prompt(tokenizer, prompt, chat)
    else:
        try:
            prompt_tokens = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SurgeryError(f"--prompt-ids {prompt_ids!r} is not a list of integers; write e.g. 1,2,3") from None
        if any(not 0 <= t < model.manifest.vocab_size for t in prompt_tokens):
            raise SurgeryError(f"prompt ids must be in 0..{model.manifest.vocab_size - 1}")
    media = None
    if image is not None:
        from surgery.vision_input import image_request

        prompt_tokens, media = image_request(model, image, tokenizer, prompt, chat, prompt_tokens)
    sampling = Sampling(top_k, top_p, temperature, penalty, seed) if sample else None
    if lora is not None and lora not in (model.manifest.compiled.files if model.manifest.compiled else []):
        raise SurgeryError(f"--lora {lora}: {onnx_dir} has no such adapter model; it is written by `surgery convert "
                           "-c mnn --lora DIR --lora-mode separate` (as lora.mnn)")
    result = model.generate(prompt_tokens, max_new_tokens, eos=stop_ids(model.manifest, tokenizer), sampling=sampling,
                            **({"media": media} if media is not None else {}), **({"lora": lora} if lora else {}))
    text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer else None
    if as_json:
        emit_json({"text": text, "tokens": result.tokens, "prompt_tokens": len(prompt_tokens),
                   "prefill_ms": result.prefill_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
                   "backend": model.manifest.backend})
    else:
        out.print(text if text is not None else " ".join(map(str, result.tokens)), highlight=False)
        out.print(f"prefill {result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s")


@app.command("optimize")
def optimize_cmd(
    onnx_dir: OnnxDir,
    target: Annotated[str, typer.Option(help="A pass pipeline (see `surgery passes`): generic or a chip's.")
                      ] = "generic",
    passes: Annotated[str, typer.Option(help="Comma-separated passes instead of the target's pipeline.")] = "",
    skip: Annotated[str, typer.Option(help="Comma-separated passes to leave out.")] = "",
    keep: Annotated[bool, typer.Option("--keep/--no-keep",
                                       help="Keep changed graphs' originals (<name>.original.onnx).")] = True,
    check: Annotated[bool, typer.Option("--check/--no-check",
                                        help="Check every changed graph against its input on onnxruntime.")] = True,
    as_json: Json = False,
) -> None:
    """Rewrite every graph with a target's pass pipeline, in place, each checked against its input.

    Example: surgery optimize ./qwen-onnx --target bm1684x
    """
    from surgery.optimize import optimize_dir

    with progress("optimizing", as_json) as report:
        reports = optimize_dir(onnx_dir, target, list(ids(passes)) or None, ids(skip), keep, check, progress=report)
    if as_json:
        emit_json([{"graph": r.graph, "cosine": r.cosine, "counts": r.counts} for r in reports])
        return
    names = [name for name, _, _ in reports[0].counts]
    table = Table(title=f"node counts after each pass ({target})")
    for col in ("graph", *names, "cosine"):
        table.add_column(col, justify="right")
    for r in reports:
        cosine = "-" if r.cosine is None else f"{r.cosine:.7f}"
        table.add_row(r.graph, *(str(nodes) for _, _, nodes in r.counts), cosine)
    out.print(table)


@app.command("passes")
def passes_cmd(as_json: Json = False) -> None:
    """List every graph pass, the targets that run it, and the compiler problems it avoids.

    Example: surgery passes --json
    """
    from surgery.passes import PASSES
    from surgery.passes.pipelines import TARGETS
    from surgery.passes.workarounds import WORKAROUNDS

    rows = [{"pass": name, "summary": p.summary,
             "targets": [t for t, spec in TARGETS.items() if name in spec["passes"]],
             "avoids": [w.id for w in WORKAROUNDS if w.avoided_by == name]} for name, p in PASSES.items()]
    if as_json:
        emit_json({"passes": rows, "workarounds": [vars(w) for w in WORKAROUNDS], "targets": TARGETS})
        return
    table = Table(title="graph passes")
    for col in ("pass", "what it does", "targets", "avoids"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pass"], r["summary"], ", ".join(r["targets"]), ", ".join(r["avoids"]))
    out.print(table)
    known = Table(title="known compiler problems")
    for col in ("id", "compiler", "versions", "symptom", "avoided by"):
        known.add_column(col)
    for w in WORKAROUNDS:
        known.add_row(w.id, w.compiler, w.versions, w.symptom, w.avoided_by or w.note)
    out.print(known)
