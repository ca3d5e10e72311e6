"""What every command group shares: the app, the consoles, option declarations written once, JSON output
and the progress line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Hugging Face LLMs exportable to edge NPUs: patch, export, optimize, compile.")
out = Console()
err = Console(stderr=True)


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


class Executor(StrEnum):
    local = "local"
    ray = "ray"


Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
Trust = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own code to run.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an output surgery wrote for other inputs (never a "
                                                     "directory surgery did not write).")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Graphs compiled in parallel.")]
Checks = Annotated[Check, typer.Option(help="Graphs checked: none, sample (embeddings, every decode block, head; on a "
                                            "simulator the first, a middle and the last layer's decode block) or all "
                                            "(also prefill blocks and weightless heads).")]
Executors = Annotated[Executor, typer.Option(help="Where graph builds run: local workers, or a Ray cluster "
                                                  "(Sophgo; pip install 'llm-surgery[ray]').")]
Address = Annotated[str | None, typer.Option("--address", help="Ray cluster address for --executor ray "
                                                               "(default: a local one).")]
OnnxDir = Annotated[Path, typer.Argument(help="A directory written by `surgery export` / `optimize`.")]


def ids(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextmanager
def progress(label: str, quiet: bool) -> Iterator[Callable[[str], None]]:
    """A transient progress line on stderr; yields the callback stages call with what they are doing."""
    from rich.progress import Progress

    with Progress(console=err, transient=True, disable=quiet) as bar:
        task = bar.add_task(label, total=None)
        yield lambda name: bar.update(task, description=f"{label} {name}")
