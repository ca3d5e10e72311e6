"""The `surgery` command line: one typer app; user-fixable errors become one line and exit code 2."""

from __future__ import annotations

import json
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from surgery.codemod import Outcome
from surgery.errors import SurgeryError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face LLMs exportable to edge NPUs: patch, export, optimize, compile.")
out = Console()
err = Console(stderr=True)

OUTCOME_STYLE = {Outcome.APPLIED: "green", Outcome.ALREADY_APPLIED: "cyan",
                 Outcome.NOT_APPLICABLE: "yellow", Outcome.ANCHOR_NOT_FOUND: "red"}


class Dtype(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Exporter(StrEnum):
    torchscript = "torchscript"
    dynamo = "dynamo"


class Check(StrEnum):
    none = "none"
    sample = "sample"
    all = "all"


class FixtureRevision(StrEnum):
    nov = "2023-11"
    dec = "2023-12"


def _ids(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command("apply")
def apply_cmd(
    pack: Annotated[str, typer.Argument(help="Pack name (see `surgery list`), or auto (from model_type).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Hugging Face model directory.")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o",
                                                 help="Output directory [default: MODEL-surgery].")] = None,
    seq_length: Annotated[int | None, typer.Option("--seq-length", "-s", min=1,
                                                   help="Static sequence length written to the config.")] = None,
    dtype: Annotated[Dtype | None, typer.Option(help="Precision flag written to the config.")] = None,
    only: Annotated[str, typer.Option(help="Comma-separated patch ids to run (default: all).")] = "",
    skip: Annotated[str, typer.Option(help="Comma-separated patch ids not to run.")] = "",
    load_only: Annotated[bool, typer.Option("--load-only", help="Only the patches that make the unchanged "
                                            "model load on the installed transformers.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the unified diff; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an output surgery wrote for another model "
                                        "(never a directory surgery did not write).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Rewrite a model's modeling code with a patch pack (libcst; the model's code is never run).

    Example: surgery apply qwen --model ./Qwen-7B-Chat --seq-length 512
    """
    from surgery.apply import default_out, plan_apply, read_config, write_plan
    from surgery.packs import ApplyOptions, resolve_pack

    chosen = resolve_pack(pack, read_config(model)[0] if pack == "auto" else {})
    options = ApplyOptions(seq_length=seq_length, dtype=dtype.value if dtype else None,
                           only=chosen.load_only if load_only else _ids(only), skip=_ids(skip))
    plan = plan_apply(chosen, model, options)
    target = out_dir or default_out(model)
    summary = {"pack": chosen.name, "model": str(model), "out": None, "changed": plan.changed,
               "patches": [r.as_dict() for r in plan.results]}
    if dry_run:
        if as_json:
            _emit_json(summary | {"diff": plan.diff()})
        else:
            sys.stdout.write(plan.diff() or "# nothing to change: every patch is already applied\n")
        return
    if plan.changed:
        write_plan(plan, target, force=force)
        summary["out"] = str(target)
    if as_json:
        _emit_json(summary)
        return
    table = Table(title=f"pack {chosen.name} on {model}")
    for col in ("patch", "file", "outcome", "rule / reason"):
        table.add_column(col)
    for r in plan.results:
        table.add_row(r.patch, r.file, f"[{OUTCOME_STYLE[r.outcome]}]{r.outcome}[/]", r.rule or r.detail)
    out.print(table)
    if plan.changed:
        out.print(f"wrote [bold]{target}[/] (record: {target / 'surgery.json'})")
    else:
        out.print("nothing to change: every patch is already applied and the config matches; nothing written")


@app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False) -> None:
    """List patch packs, their patches, and what each patch is for.

    Example: surgery list --json
    """
    from surgery.packs import all_packs

    packs = all_packs()
    if as_json:
        _emit_json([{"name": p.name, "version": p.version, "summary": p.summary, "model_types": list(p.model_types),
                     "checked_with": p.checked_with,
                     "patches": [{"file": f, "id": x.id, "summary": x.summary, "required": x.required,
                                  "rules": [r.name for r in x.rules]} for f, ps in p.files.items() for x in ps]}
                    for p in packs.values()])
        return
    for p in packs.values():
        table = Table(title=f"{p.name} {p.version}: {p.summary}  (model_type {', '.join(p.model_types)}; "
                            f"transformers {p.checked_with})", title_justify="left")
        for col in ("patch", "file", "required", "rules", "what it is for"):
            table.add_column(col)
        for f, patches in p.files.items():
            for x in patches:
                table.add_row(x.id, f, "yes" if x.required else "no", ", ".join(r.name for r in x.rules), x.summary)
        out.print(table)


@app.command("fixture")
def fixture_cmd(
    kind: Annotated[str, typer.Argument(help="Family: qwen (remote code), llama, qwen2, qwen3, mistral, phi3.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    revision: Annotated[FixtureRevision,
                        typer.Option(help="qwen only: upstream revision style to imitate.")] = FixtureRevision.nov,
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="The written path on stdout.")] = False,
) -> None:
    """Build a tiny random-weight model directory (no hub, seconds) to try the pipeline on.

    Example: surgery fixture qwen --out ./tiny-qwen --revision 2023-12
    """
    from surgery.fixtures.native import FAMILIES, build_native
    from surgery.fixtures.qwen_v1 import build
    from surgery.fsutil import staged_directory
    from surgery.outputs import claim, write_record

    if kind != "qwen" and kind not in FAMILIES:
        raise SurgeryError(f"no fixture named {kind!r}; available: qwen, {', '.join(FAMILIES)}")
    claim(out_dir, "fixture", {}, create=False)  # never over a directory surgery did not write
    with staged_directory(out_dir) as stage:
        if kind == "qwen":
            build(stage, revision=revision.value, seed=seed)
        else:
            build_native(kind, stage, seed=seed)
        write_record(stage, "fixture", {})
    path = out_dir
    if as_json:
        _emit_json({"fixture": kind, "path": str(path)})
    else:
        out.print(f"wrote tiny {kind} to [bold]{path}[/]")


@app.command("port")
def port_cmd(
    name: Annotated[str, typer.Argument(help="The new architecture's model_type, e.g. olmo2.")],
    like: Annotated[str, typer.Option(help="The pack it resembles (see `surgery list`).")],
    dest: Annotated[Path, typer.Option(help="Project root to write patches/ and tests/ into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The written files on stdout.")] = False,
) -> None:
    """Scaffold a pack and its conformance test for a new architecture.

    Example: surgery port olmo2 --like llama
    """
    from surgery.port import scaffold

    written = scaffold(name, like, dest, force)
    if as_json:
        _emit_json({"files": [str(p) for p in written]})
        return
    for path in written:
        out.print(f"wrote {path}")
    out.print(f"next: pytest tests/test_pack_{name}.py  (docs/porting.md explains a failed anchor)")


@app.command("optimize")
def optimize_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="A directory written by `surgery export`.")],
    target: Annotated[str, typer.Option(help="generic, bm1684x, bm1688, cv186ah, mnn, ax650.")] = "generic",
    passes: Annotated[str, typer.Option(help="Comma-separated passes instead of the target's pipeline.")] = "",
    skip: Annotated[str, typer.Option(help="Comma-separated passes to leave out.")] = "",
    keep: Annotated[bool, typer.Option("--keep/--no-keep",
                                       help="Keep changed graphs' originals (<name>.original.onnx).")] = True,
    check: Annotated[bool, typer.Option("--check/--no-check",
                                        help="Check every graph against its input on onnxruntime.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Node counts per pass on stdout.")] = False,
) -> None:
    """Rewrite every graph with a target's pass pipeline, in place, each checked against its input.

    Example: surgery optimize ./qwen-onnx --target bm1684x
    """
    from rich.progress import Progress

    from surgery.optimize import optimize_dir

    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("optimizing", total=None)
        reports = optimize_dir(onnx_dir, target, list(_ids(passes)) or None, _ids(skip), keep, check,
                               progress=lambda name: bar.update(task, description=f"optimizing {name}"))
    if as_json:
        _emit_json([{"graph": r.graph, "cosine": r.cosine, "counts": r.counts} for r in reports])
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
def passes_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable list.")] = False) -> None:
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
        _emit_json({"passes": rows, "workarounds": [vars(w) for w in WORKAROUNDS],
                    "targets": {t: spec for t, spec in TARGETS.items()}})
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
        known.add_row(w.id, w.compiler, w.versions, w.symptom, w.avoided_by)
    out.print(known)


toolchain_app = typer.Typer(no_args_is_help=True, help="Vendor toolchains, each in its own environment.")
app.add_typer(toolchain_app, name="toolchain")


@toolchain_app.command("install")
def toolchain_install_cmd(
    name: Annotated[str, typer.Argument(help="mnn, sophgo or rknn.")],
    as_json: Annotated[bool, typer.Option("--json", help="The toolchain record on stdout.")] = False,
) -> None:
    """Create a toolchain's own environment under the cache directory ($SURGERY_HOME or ~/.cache/surgery).

    Example: surgery toolchain install mnn
    """
    from surgery.compile.toolchains import install

    record = install(name, log=lambda line: err.print(f"[dim]{name}:[/] {line}"))
    if as_json:
        _emit_json(record)
        return
    out.print(f"{name} {record['version']} installed" + (f" ({'; '.join(record['fixes'])})" if record["fixes"] else ""))


@toolchain_app.command("doctor")
def toolchain_doctor_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """What is installed, versions, and what is missing.

    Example: surgery toolchain doctor --json
    """
    from surgery.compile.toolchains import doctor

    rows = doctor()
    if as_json:
        _emit_json(rows)
        return
    table = Table(title="vendor toolchains")
    for col in ("toolchain", "installed", "version", "path", "to install"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["toolchain"], "yes" if r["installed"] else "no", r["version"] or "-", r["path"],
                      r["missing"] or "-")
    out.print(table)


@app.command("compile")
def compile_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="A directory written by `surgery export` / `optimize`.")],
    chip: Annotated[str, typer.Option("--chip", "-c", help="bm1684x, bm1688, cv186ah, mnn, ax650 or ax630c.")
                    ] = "bm1684x",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("compiled"),
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="Sophgo: bf16, f16, w8bf16, w4bf16, w8f16, "
                                          "w4f16.")] = "w4bf16",
    group_size: Annotated[int, typer.Option("--q-group-size", "-g", help="Sophgo weight group size.")] = 64,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="Sophgo: symmetric weight quantization.")] = False,
    num_core: Annotated[int, typer.Option(help="Sophgo: cores (bm1688: 2).")] = 1,
    num_device: Annotated[int, typer.Option(help="Sophgo: devices.")] = 1,
    quant_bits: Annotated[int | None, typer.Option(help="MNN: weight bits, 4 or 8 (default: float).")] = None,
    quant_block: Annotated[int, typer.Option(help="MNN: weight quantization block, 32/64/128.")] = 64,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Graphs compiled in parallel.")] = 2,
    check: Annotated[Check, typer.Option(help="Compiled graphs checked against onnxruntime (the simulator for "
                                         "Sophgo): none, sample (embeddings, every decode block, head) or all "
                                         "(also prefill blocks and weightless heads).")] = Check.sample,
    as_json: Annotated[bool, typer.Option("--json", help="Parity table on stdout.")] = False,
) -> None:
    """Compile an export for a chip, then check the compiled graphs against onnxruntime.

    Example: surgery compile ./qwen-onnx --chip bm1684x -q w4bf16 -g 64 -o ./qwen-bm1684x
    """
    if chip == "mnn":
        from surgery.compile.mnn import compile_mnn

        if quant_bits not in (None, 4, 8):
            raise SurgeryError(f"--quant-bits {quant_bits} is not supported; use 4 or 8")
        manifest = compile_mnn(onnx_dir, out_dir, bits=quant_bits, block=quant_block, jobs=jobs, check=check.value)
    elif chip in ("ax650", "ax630c"):
        from surgery.compile.axera import AxeraOptions, compile_axera

        kit = compile_axera(onnx_dir, out_dir, AxeraOptions(chip=chip))
        if as_json:
            _emit_json({"out": str(out_dir), "chip": chip, "built": kit.compiled["built"],
                        "graphs": kit.compiled["graphs"]})
        elif kit.compiled["built"]:
            out.print(f"built {len(kit.compiled['graphs'])} axmodels with pulsar2 in [bold]{out_dir}/build[/]")
        else:
            out.print(f"pulsar2 is not on PATH: wrote the build kit and [bold]{out_dir / 'build.sh'}[/] "
                      "(run it inside Axera's pulsar2 container)")
        return
    else:
        from surgery.compile.sophgo import SophgoOptions, compile_sophgo

        manifest = compile_sophgo(onnx_dir, out_dir, SophgoOptions(chip, quantize, group_size, symmetric, num_core,
                                                                  num_device, jobs, check.value))
    rows = manifest.compiled["parity"]
    if as_json:
        _emit_json({"out": str(out_dir), "chip": chip, "parity": rows})
        return
    table = Table(title=f"{chip}: compiled graph vs onnxruntime")
    for col in ("graph", "output", "cosine", "max abs"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["graph"], r["output"], f"{r['cosine']:.6f}", f"{r['max_abs']:.2e}")
    out.print(table)
    out.print(f"wrote [bold]{out_dir}[/]")


@app.command("convert")
def convert_cmd(
    pack: Annotated[str, typer.Argument(help="Pack name, or auto (from model_type).")],
    model_path: Annotated[Path, typer.Option("--model_path", "-m", help="Hugging Face model directory.")],
    out_dir: Annotated[Path, typer.Option("--out_dir", "-o", help="Bundle directory.")],
    seq_length: Annotated[int, typer.Option("--seq_length", "-s", min=2, help="Static sequence length.")] = 512,
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="bf16, f16, w8bf16, w4bf16, w8f16, w4f16 "
                                          "(mnn: w8*/w4* pick 8/4-bit weights).")] = "w4bf16",
    q_group_size: Annotated[int, typer.Option("--q_group_size", "-g", help="Weight group size.")] = 64,
    chip: Annotated[str, typer.Option("--chip", "-c", help="bm1684x, bm1688, cv186ah, mnn, ax650, ax630c.")
                    ] = "bm1684x",
    num_device: Annotated[int, typer.Option("--num_device", help="Devices (Sophgo).")] = 1,
    num_core: Annotated[int, typer.Option("--num_core", help="Cores (Sophgo bm1688: 2).")] = 1,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="Symmetric weight quantization.")] = False,
    max_input_length: Annotated[int | None, typer.Option("--max_input_length",
                                                         help="Longest prompt the runtime accepts.")] = None,
    embedding_disk: Annotated[bool, typer.Option("--embedding_disk", help="Embedding as a bf16 table on the "
                                                 "host instead of graphs.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                    help="Allow the model's own modeling code to run.")] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Graphs compiled in parallel.")] = 2,
    check: Annotated[Check, typer.Option(help="Graphs checked at each stage: none, sample (embeddings, every "
                                         "decode block, head) or all (also prefill blocks and weightless heads)."
                                         )] = Check.sample,
    force: Annotated[bool, typer.Option("--force", help="Replace a bundle surgery wrote for another model "
                                        "(never a directory surgery did not write).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Result on stdout.")] = False,
) -> None:
    """apply -> export -> optimize -> compile -> verify, into a device bundle with report.md/report.html.
    Resumes where it stopped; flags follow llm_convert.py.

    Example: surgery convert qwen -m ./Qwen-7B-Chat -s 512 -q w4bf16 -g 128 -c bm1684x -o ./qwen_7b --trust-remote-code
    """
    from rich.progress import Progress

    from surgery.convert import ConvertOptions, convert

    options = ConvertOptions(pack, model_path, out_dir, seq_length, quantize, q_group_size, chip, num_device,
                             num_core, symmetric, max_input_length, embedding_disk, trust_remote_code, jobs,
                             check.value, force)
    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("converting", total=None)
        result = convert(options, progress=lambda stage: bar.update(task, description=f"{stage}"))
    if as_json:
        _emit_json(result)
        return
    out.print(f"bundle in [bold]{out_dir}[/]: {', '.join(f'{k} {v:.1f}s' for k, v in result['timings'].items())}; "
              f"report: {out_dir / 'report.html'}")


tokenizer_app = typer.Typer(no_args_is_help=True, help="The model's tokenizer for board runtimes.")
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("serve")
def tokenizer_serve_cmd(
    directory: Annotated[Path, typer.Argument(help="Model, export or bundle directory with tokenizer files.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 12345,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                    help="Allow the tokenizer's own code to run.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds a client gets to send a request's headers (and to stay "
                                                "idle between requests), and again its body.")] = 5.0,
) -> None:
    """Serve /encode (with the chat template), /decode, /bos_id, /eos_id over HTTP until SIGTERM or Ctrl-C.

    Example: surgery tokenizer serve ./Qwen2.5-0.5B-Instruct --host 127.0.0.1 --port 12345
    """
    from surgery.tokserver import make_server

    server = make_server(directory, host, port, trust_remote_code, timeout=timeout)
    bound, bound_port = server.server_address
    url_host = f"[{bound}]" if ":" in bound else bound
    out.print(f"serving the tokenizer of {directory} on http://{url_host}:{bound_port} "
              f"(vocabulary {server.app.vocab_size})", highlight=False, soft_wrap=True)
    server.serve_forever()
    out.print("stopped", highlight=False)


def _parse_blocks(text: str | None) -> tuple[int, ...] | None:
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
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                    help="Allow running the model's own modeling code.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Export a patched model to static per-block ONNX graphs with a manifest (resumes if interrupted).

    Example: surgery export ./Qwen-7B-Chat-surgery --out ./qwen-onnx --seq-length 512 --trust-remote-code
    """
    from rich.progress import Progress

    from surgery.export.exporter import ExportOptions, export_model

    options = ExportOptions(seq_length=seq_length, dtype=dtype.value, blocks=_parse_blocks(blocks), opset=opset,
                            trust_remote_code=trust_remote_code, embedding_disk=embedding_disk,
                            exporter=exporter.value)
    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("exporting", total=None)
        manifest = export_model(model, out_dir, options,
                                progress=lambda name: bar.update(task, description=f"exporting {name}", advance=1))
    if as_json:
        _emit_json({"out": str(out_dir), "graphs": [g.file for g in manifest.graphs]})
    else:
        out.print(f"wrote {len(manifest.graphs)} graphs (opset {manifest.opset}) and manifest.json "
                  f"to [bold]{out_dir}[/]")
        if manifest.opset > opset:
            err.print(f"[yellow]note:[/] the {exporter.value} exporter wrote opset {manifest.opset}; compilers that "
                      f"need {opset} want the torchscript exporter")


@app.command("verify")
def verify_cmd(
    onnx_dir: Annotated[Path, typer.Argument(help="A directory written by `surgery export`.")],
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                    help="Allow running the model's own modeling code.")] = False,
    min_cosine: Annotated[float, typer.Option(help="Fail below this cosine.")] = 0.99999,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable table on stdout.")] = False,
) -> None:
    """Compare every graph on onnxruntime with the patched torch module (cosine, max-abs).

    Example: surgery verify ./qwen-onnx --trust-remote-code
    """
    from surgery.export.verify import verify_export

    rows = verify_export(onnx_dir, trust_remote_code=trust_remote_code)
    if as_json:
        _emit_json([r.as_dict() for r in rows])
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
    onnx_dir: Annotated[Path, typer.Argument(help="A directory written by `surgery export`.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt text (tokenized with the exported tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help="Comma-separated prompt token ids.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    backend: Annotated[str, typer.Option(help="auto (from the manifest), onnxruntime or mnn.")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                    help="Allow the tokenizer's own code to run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Text, tokens and timings on stdout.")] = False,
) -> None:
    """Greedy generation with a host-side KV cache, the way device runtimes do it: exported graphs on
    onnxruntime, or a `surgery compile --chip mnn` directory on the MNN runtime (picked from the manifest).

    Example: surgery run ./qwen-onnx --prompt "Hello" --chat --max-new-tokens 32 --json
    """
    from surgery.runtime import load_tokenizer, open_runtime

    if (prompt is None) == (prompt_ids is None):
        raise SurgeryError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    model = open_runtime(onnx_dir)
    if backend not in ("auto", model.manifest.backend):
        raise SurgeryError(f"{onnx_dir} holds {model.manifest.backend} models, not {backend}; "
                           f"compile for it first (e.g. `surgery compile {onnx_dir} --chip mnn`)")
    tokenizer = None
    if prompt is not None:
        tokenizer = load_tokenizer(onnx_dir, trust_remote_code)
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SurgeryError(f"--prompt-ids {prompt_ids!r} is not a list of integers; write e.g. 1,2,3") from None
        if any(not 0 <= t < model.manifest.vocab_size for t in ids):
            raise SurgeryError(f"prompt ids must be in 0..{model.manifest.vocab_size - 1}")
    eos = model.manifest.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    result = model.generate(list(ids), max_new_tokens, eos=eos_ids)
    backend = model.manifest.backend
    text = tokenizer.decode(result.tokens, skip_special_tokens=True) if tokenizer else None
    if as_json:
        _emit_json({"text": text, "tokens": result.tokens, "prompt_tokens": len(ids), "prefill_ms": result.prefill_ms,
                    "decode_tokens_per_s": result.decode_tokens_per_s, "backend": backend})
    else:
        out.print(text if text is not None else " ".join(map(str, result.tokens)), highlight=False)
        out.print(f"prefill {result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.1f} tokens/s")


def main() -> None:
    from surgery.errors import explain

    try:
        app()
    except SurgeryError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: finished work is kept; rerun the same command to resume", highlight=False)
        raise SystemExit(130) from None
    except Exception as exc:  # the user's data or environment (disk, names, damaged files); a bug re-raises
        message = explain(exc)
        if message is None:
            raise
        err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
