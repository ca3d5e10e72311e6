"""Commands about patch packs: apply, list, fixture, port."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from surgery.cli.common import Dtype, Force, Json, app, emit_json, ids, out
from surgery.codemod import Outcome
from surgery.errors import SurgeryError

OUTCOME_STYLE = {Outcome.APPLIED: "green", Outcome.ALREADY_APPLIED: "cyan",
                 Outcome.NOT_APPLICABLE: "yellow", Outcome.ANCHOR_NOT_FOUND: "red"}


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
    lora: Annotated[Path | None, typer.Option("--lora", help="A PEFT LoRA adapter directory, linked into the "
                                              "output's lora/ so export merges it into the weights.")] = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Rewrite a model's modeling code with a patch pack (libcst; the model's code is never run).

    Example: surgery apply qwen --model ./Qwen-7B-Chat --seq-length 512
    """
    from surgery.apply import default_out, plan_apply, read_config, write_plan
    from surgery.export.checkpoint import attach_lora, check_lora
    from surgery.packs import ApplyOptions, resolve_pack

    check_lora(lora, "merged")
    chosen = resolve_pack(pack, read_config(model)[0] if pack == "auto" else {})
    options = ApplyOptions(seq_length=seq_length, dtype=dtype.value if dtype else None,
                           only=chosen.load_only if load_only else ids(only), skip=ids(skip))
    plan = plan_apply(chosen, model, options)
    target = out_dir or default_out(model)
    summary = {"pack": chosen.name, "model": str(model), "out": None, "changed": plan.changed,
               "patches": [r.as_dict() for r in plan.results]}
    if dry_run:
        if as_json:
            emit_json(summary | {"diff": plan.diff()})
        else:
            sys.stdout.write(plan.diff() or "# nothing to change: every patch is already applied\n")
        return
    if lora is not None and not plan.changed:
        raise SurgeryError(f"{model} needs no patches, so nothing is written to attach --lora to; apply to the "
                           "original model, or link the adapter into the model's lora/ folder")
    if plan.changed:
        write_plan(plan, target, force=force)
        if lora is not None:
            attach_lora(target, lora)
        summary["out"] = str(target)
    if as_json:
        emit_json(summary)
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


def _rule_names(patch) -> list[str]:
    return [getattr(r, "name", None) or getattr(getattr(r, "func", None), "name", None) or repr(r)
            for r in patch.rules]


@app.command("list")
def list_cmd(as_json: Json = False) -> None:
    """List patch packs, their patches, and what each patch is for.

    Example: surgery list --json
    """
    from surgery.packs import all_packs

    packs = all_packs()
    if as_json:
        emit_json([{"name": p.name, "version": p.version, "summary": p.summary, "model_types": list(p.model_types),
                    "checked_with": p.checked_with,
                    "patches": [{"file": f, "id": x.id, "summary": x.summary, "required": x.required,
                                 "rules": _rule_names(x)} for f, ps in p.files.items() for x in ps]}
                   for p in packs.values()])
        return
    for p in packs.values():
        table = Table(title=f"{p.name} {p.version}: {p.summary}  (model_type {', '.join(p.model_types)}; "
                            f"transformers {p.checked_with})", title_justify="left")
        for col in ("patch", "file", "required", "rules", "what it is for"):
            table.add_column(col)
        for f, patches in p.files.items():
            for x in patches:
                table.add_row(x.id, f, "yes" if x.required else "no", ", ".join(_rule_names(x)), x.summary)
        out.print(table)


@app.command("fixture")
def fixture_cmd(
    kind: Annotated[str, typer.Argument(help="Family: qwen, chatglm, internlm2, minicpm, baichuan (remote "
                                             "code), llama, qwen2, qwen3, mistral, phi3; qwen2-gptq, "
                                             "qwen2-gptq-actorder, qwen2-gptq-actorder-calibrated, qwen2-awq "
                                             "(quantized checkpoints), qwen2-lora (a PEFT adapter for the qwen2 "
                                             "fixture); qwen2_vl, "
                                             "qwen2_5_vl, internvl, internvl_hf (vision-language).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    revision: Annotated[str | None, typer.Option(help="qwen and chatglm: the upstream revision style to imitate "
                                                      "(default: qwen 2023-11, chatglm 2023-07; a wrong one lists "
                                                      "the choices).")] = None,
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    as_json: Json = False,
) -> None:
    """Build a tiny random-weight model directory (no hub, seconds) to try the pipeline on.

    Example: surgery fixture qwen --out ./tiny-qwen --revision 2023-12
    """
    from functools import partial

    from surgery.fixtures import baichuan, chatglm, internlm2, internvl, internvl_hf, minicpm, qwen_v1
    from surgery.fixtures.lora import build_lora
    from surgery.fixtures.native import FAMILIES, build_native
    from surgery.fixtures.quantized import FIXTURES as QUANTIZED
    from surgery.fixtures.quantized import build_quantized
    from surgery.fixtures.qwen2_vl import build_qwen2_vl
    from surgery.fsutil import staged_directory
    from surgery.outputs import claim, write_record

    remote = {"qwen": (qwen_v1.build, qwen_v1.REVISIONS, "2023-11"),
              "chatglm": (chatglm.build, chatglm.REVISIONS, "2023-07"),
              "internlm2": (internlm2.build, internlm2.REVISIONS, "2024-01"),
              "minicpm": (minicpm.build, minicpm.REVISIONS, "2024-02"),
              "baichuan": (baichuan.build, baichuan.REVISIONS, "7b")}  # family -> builder, styles, default
    derived = [*QUANTIZED, "qwen2-lora"]  # a GPTQ/AWQ checkpoint, or a LoRA adapter for the qwen2 fixture
    vl = {f: partial(build_qwen2_vl, family=f) for f in ("qwen2_vl", "qwen2_5_vl")}  # vision-language
    vl["internvl"] = internvl.build  # InternVL remote code (Qwen2 LLM)
    vl["internvl_hf"] = internvl_hf.build  # transformers' native InternVL (the -hf checkpoints)
    if kind not in remote and kind not in FAMILIES and kind not in derived and kind not in vl:
        raise SurgeryError(f"no fixture named {kind!r}; available: "
                           f"{', '.join([*remote, *FAMILIES, *derived, *vl])}")
    if kind in remote:
        build, revisions, default = remote[kind]
        revision = revision or default
        if revision not in revisions:
            raise SurgeryError(f"--revision {revision!r}: choose one of {', '.join(revisions)}")
    claim(out_dir, "fixture", {}, create=False)  # never over a directory surgery did not write
    with staged_directory(out_dir) as stage:
        if kind in remote:
            build(stage, revision=revision, seed=seed)
        elif kind in QUANTIZED:
            build_quantized(stage, QUANTIZED[kind], seed=seed)
        elif kind in vl:
            vl[kind](stage, seed=seed)
        elif kind == "qwen2-lora":
            build_lora(build_native("qwen2", stage / "base"), stage, seed=seed)
            shutil.rmtree(stage / "base")
        else:
            build_native(kind, stage, seed=seed)
        write_record(stage, "fixture", {})
    if as_json:
        emit_json({"fixture": kind, "path": str(out_dir)})
    else:
        out.print(f"wrote tiny {kind} to [bold]{out_dir}[/]")


@app.command("port")
def port_cmd(
    name: Annotated[str, typer.Argument(help="The new architecture's model_type, e.g. olmo2.")],
    like: Annotated[str, typer.Option(help="The pack it resembles (see `surgery list`).")],
    dest: Annotated[Path, typer.Option(help="Project root to write patches/ and tests/ into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite a scaffold `surgery port` wrote.")] = False,
    as_json: Json = False,
) -> None:
    """Scaffold a pack and its conformance test for a new architecture.

    Example: surgery port olmo2 --like llama
    """
    from surgery.port import scaffold

    written = scaffold(name, like, dest, force)
    if as_json:
        emit_json({"files": [str(p) for p in written]})
        return
    for path in written:
        out.print(f"wrote {path}")
    out.print(f"next: pytest tests/test_pack_{name}.py  (docs/porting.md explains a failed anchor)")
