"""Commands that reach a chip: compile, convert, chips, toolchain. Every chip name, help text and check comes
from the adapter registry (compile/registry.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgery.cli.common import (
    Address,
    Check,
    Checks,
    Executor,
    Executors,
    Force,
    Jobs,
    Json,
    OnnxDir,
    Trust,
    app,
    emit_json,
    err,
    out,
    progress,
)

Layout = Annotated[str, typer.Option(help="runtime: the files the vendor runtime loads (mnn: MNN's LLM engine, "
                                          "llm.mnn + config.json); graphs (mnn only): one .mnn per exported graph.")]


def _chips() -> str:
    from surgery.compile.registry import all_chips

    return ", ".join(all_chips())


def _executor(kind: Executor, address: str | None, jobs: int):
    if kind is Executor.local:
        return None
    from surgery.compile.executors import RayExecutor

    return RayExecutor(address, jobs)


@app.command("compile")
def compile_cmd(
    onnx_dir: OnnxDir,
    chip: Annotated[str, typer.Option("--chip", "-c", help="The chip; see `surgery chips`.")] = "bm1684x",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("compiled"),
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="bf16, f16, w8bf16, w4bf16, w8f16, w4f16 (mnn "
                                          "also fp32; w8*/w4* are 8/4-bit weights).")] = "w4bf16",
    group_size: Annotated[int, typer.Option("--q-group-size", "-g", help="Weight quantization group.")] = 64,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="Symmetric weight quantization.")] = False,
    num_core: Annotated[int, typer.Option(help="Cores (bm1688: 2).")] = 1,
    num_device: Annotated[int, typer.Option(help="Devices.")] = 1,
    layout: Layout = "runtime",
    jobs: Jobs = 2,
    check: Checks = Check.sample,
    executor: Executors = Executor.local,
    address: Address = None,
    as_json: Json = False,
) -> None:
    """Compile an export for a chip, then check the compiled graphs against onnxruntime.

    Example: surgery compile ./qwen-onnx --chip bm1684x -q w4bf16 -g 64 -o ./qwen-bm1684x
    """
    from surgery.compile.base import CompileOptions
    from surgery.compile.registry import adapter_for

    adapter = adapter_for(chip)
    options = CompileOptions(chip, quantize, group_size, symmetric, num_core, num_device, jobs, check.value, layout)
    adapter.preflight(options)
    farm = _executor(executor, address, jobs)
    try:
        manifest = adapter.compile(onnx_dir, out_dir, options, executor=farm)
    finally:
        if farm is not None:
            farm.close()
    compiled = manifest.compiled
    if as_json:
        emit_json({"out": str(out_dir), "chip": chip, "adapter": adapter.name, "files": compiled.files,
                   "parity": compiled.parity, "details": compiled.details})
        return
    if compiled.parity:
        table = Table(title=f"{chip}: compiled graph vs onnxruntime")
        for col in ("graph", "output", "cosine", "max abs"):
            table.add_column(col)
        for r in compiled.parity:
            table.add_row(r["graph"], r["output"], f"{r['cosine']:.6f}", f"{r['max_abs']:.2e}")
        out.print(table)
    if "built" in compiled.details and not compiled.details["built"]:
        out.print(f"the compiler is not on PATH here: wrote the build kit and [bold]{out_dir / 'build.sh'}[/] "
                  f"(runs where {adapter.loaded_by.split(',')[0]})")
    out.print(f"wrote [bold]{out_dir}[/] ({', '.join(compiled.files)})")


@app.command("convert")
def convert_cmd(
    pack: Annotated[str, typer.Argument(help="Pack name, or auto (from model_type).")],
    model_path: Annotated[Path, typer.Option("--model_path", "-m", help="Hugging Face model directory.")],
    out_dir: Annotated[Path, typer.Option("--out_dir", "-o", help="Bundle directory.")],
    seq_length: Annotated[int, typer.Option("--seq_length", "-s", min=2, help="Static sequence length.")] = 512,
    quantize: Annotated[str | None, typer.Option("--quantize", "-q", help="bf16, f16, w8bf16, w4bf16, w8f16, "
                                                 "w4f16 (mnn: w8*/w4* pick 8/4-bit weights); default w4bf16, or a "
                                                 "GPTQ/AWQ checkpoint's own bits.")] = None,
    q_group_size: Annotated[int | None, typer.Option("--q_group_size", "-g", help="Weight group size; default 64, "
                                                     "or a GPTQ/AWQ checkpoint's own.")] = None,
    lora: Annotated[Path | None, typer.Option("--lora", help="A PEFT LoRA adapter directory, merged into the "
                                              "weights at export (or see --lora-mode).")] = None,
    lora_mode: Annotated[str, typer.Option("--lora-mode", help="merged (into the weights), or separate: -c mnn "
                                           "writes lora.mnn, which MNN's engine loads over the base model "
                                           "(Llm::create_lora).")] = "merged",
    chip: Annotated[str, typer.Option("--chip", "-c", help="The chip; see `surgery chips`.")] = "bm1684x",
    num_device: Annotated[int, typer.Option("--num_device", help="Devices.")] = 1,
    num_core: Annotated[int, typer.Option("--num_core", help="Cores (bm1688: 2).")] = 1,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="Symmetric weight quantization.")] = False,
    max_input_length: Annotated[int | None, typer.Option("--max_input_length",
                                                         help="Longest prompt the runtime accepts.")] = None,
    embedding_disk: Annotated[bool, typer.Option("--embedding_disk", help="Embedding as a bf16 table on the "
                                                 "host instead of graphs.")] = False,
    image_size: Annotated[str | None, typer.Option("--image-size", "--image_size", help="Vision-language models: "
                                                   "the vision graph's image size, 448 or HEIGHTxWIDTH.")] = None,
    trust_remote_code: Trust = False,
    layout: Layout = "runtime",
    jobs: Jobs = 2,
    check: Checks = Check.sample,
    executor: Executors = Executor.local,
    address: Address = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """apply -> export -> optimize -> compile, each checked against the stage before, into a device bundle
    with report.md/report.html. Resumes where it stopped; flags follow llm_convert.py.

    Example: surgery convert qwen -m ./Qwen-7B-Chat -s 512 -q w4bf16 -g 128 -c bm1684x -o ./qwen_7b --trust-remote-code
    """
    from surgery.cli.graph_cmds import parse_image_size
    from surgery.convert import ConvertOptions, convert

    options = ConvertOptions(pack, model_path, out_dir, seq_length, quantize, q_group_size, chip, num_device,
                             num_core, symmetric, max_input_length, embedding_disk, trust_remote_code, jobs,
                             check.value, force, executor.value, address, layout, lora, lora_mode,
                             parse_image_size(image_size))
    with progress("converting:", as_json) as report:
        result = convert(options, progress=report)
    if as_json:
        emit_json(result)
        return
    out.print(f"bundle in [bold]{out_dir}[/]: {', '.join(f'{k} {v:.1f}s' for k, v in result['timings'].items())}; "
              f"report: {out_dir / 'report.html'}")


@app.command("chips")
def chips_cmd(
    markdown: Annotated[bool, typer.Option("--markdown", help="The table as docs/adapters.md holds it.")] = False,
    as_json: Json = False,
) -> None:
    """Every chip adapter: chips, toolchain, output, and which runtime loads it.

    Example: surgery chips --json
    """
    from surgery.compile.registry import adapters, chips_table

    if as_json:
        emit_json([a.describe() for a in adapters()])
    elif markdown:
        out.print(chips_table(), end="", highlight=False, soft_wrap=True)
    else:
        table = Table(title="chip adapters")
        for col in ("adapter", "chips", "toolchain", "output", "loaded on the board by"):
            table.add_column(col)
        for a in adapters():
            table.add_row(a.name, ", ".join(a.chips), a.toolchain or "-", a.backend, a.loaded_by)
        out.print(table)


toolchain_app = typer.Typer(no_args_is_help=True, help="Vendor toolchains, each in its own environment.")
app.add_typer(toolchain_app, name="toolchain")


@toolchain_app.command("install")
def toolchain_install_cmd(
    name: Annotated[str, typer.Argument(help="A toolchain of `surgery toolchain doctor`: mnn, sophgo or rknn.")],
    as_json: Json = False,
) -> None:
    """Create a toolchain's own environment under the cache directory ($SURGERY_HOME or ~/.cache/surgery).

    Example: surgery toolchain install mnn
    """
    from surgery.compile.toolchains import install

    record = install(name, log=lambda line: err.print(f"[dim]{name}:[/] {line}"))
    if as_json:
        emit_json(record)
        return
    out.print(f"{name} {record['version']} installed" + (f" ({'; '.join(record['fixes'])})" if record["fixes"] else ""))


@toolchain_app.command("doctor")
def toolchain_doctor_cmd(as_json: Json = False) -> None:
    """What is installed, versions, which chips each toolchain serves, and what is missing.

    Example: surgery toolchain doctor --json
    """
    from surgery.compile.registry import adapters
    from surgery.compile.toolchains import doctor

    rows = doctor()
    for row in rows:
        row["chips"] = [c for a in adapters() if a.toolchain == row["toolchain"] for c in a.chips]
    if as_json:
        emit_json(rows)
        return
    table = Table(title="vendor toolchains")
    for col in ("toolchain", "chips", "installed", "version", "path", "to install"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["toolchain"], ", ".join(r["chips"]) or "-", "yes" if r["installed"] else "no",
                      r["version"] or "-", r["path"], r["missing"] or "-")
    out.print(table)
