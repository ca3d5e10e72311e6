"""The `surgery` command line: one typer app; user-fixable errors become one line and exit code 2."""

from __future__ import annotations

import json
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


class FixtureRevision(StrEnum):
    nov = "2023-11"
    dec = "2023-12"


def _ids(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command("apply")
def apply_cmd(
    pack: Annotated[str, typer.Argument(help="Pack name (see `surgery list`).")],
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
    force: Annotated[bool, typer.Option("--force", help="Replace an output directory surgery did not write.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable result on stdout.")] = False,
) -> None:
    """Rewrite a model's modeling code with a patch pack (libcst; the model's code is never run).

    Example: surgery apply qwen --model ./Qwen-7B-Chat --seq-length 512
    """
    from surgery.apply import default_out, plan_apply, write_plan
    from surgery.packs import ApplyOptions, get_pack

    chosen = get_pack(pack)
    options = ApplyOptions(seq_length=seq_length, dtype=dtype.value if dtype else None,
                           only=chosen.load_only if load_only else _ids(only), skip=_ids(skip))
    plan = plan_apply(chosen, model, options)
    target = out_dir or default_out(model)
    summary = {"pack": pack, "model": str(model), "out": None, "changed": plan.changed,
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
    table = Table(title=f"pack {pack} on {model}")
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
    kind: Annotated[str, typer.Argument(help="Fixture family: qwen.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    revision: Annotated[FixtureRevision,
                        typer.Option(help="Upstream revision style to imitate.")] = FixtureRevision.nov,
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
) -> None:
    """Build a tiny random-weight model directory (no hub, seconds) to try the pipeline on.

    Example: surgery fixture qwen --out ./tiny-qwen --revision 2023-12
    """
    if kind != "qwen":
        raise SurgeryError(f"no fixture named {kind!r}; available: qwen")
    from surgery.fixtures.qwen_v1 import build

    path = build(out_dir, revision=revision.value, seed=seed)
    out.print(f"wrote tiny {kind} ({revision.value}) to [bold]{path}[/]")


def main() -> None:
    try:
        app()
    except SurgeryError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
