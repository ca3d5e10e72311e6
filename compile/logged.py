"""Running vendor tools: each call appends to its own log, and a failure says what, where and why."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from surgery.errors import SurgeryError

T = TypeVar("T")
R = TypeVar("R")


def run_logged(args: list[str], log: Path, what: str, cwd: Path | None = None, env: dict | None = None,
               expect: Path | None = None) -> None:
    """Run `args`, appending its output to `log`; on failure (a non-zero exit, or no `expect` file
    afterwards) raise with the command, the last 30 lines of the log, and the log's path."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(args)}\n")
        fh.flush()
        done = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if done.returncode or (expect is not None and not expect.is_file()):
        why = f"exit {done.returncode}" if done.returncode else f"it wrote no {expect.name}"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SurgeryError(f"{what} failed ({why})\ncommand: {shlex.join(args)}\n"
                           f"last 30 lines of {log}:\n{tail}")


def parallel(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """`fn` over `items` on `jobs` threads (each item is a subprocess), results in order."""
    items = list(items)
    if jobs <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))
