"""Run a command and measure its wall time, its largest process's peak RSS and its whole tree's peak RSS
(surgery.memwatch), so every tool in a bench is measured the same way."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from surgery.memwatch import PeakWatch


@dataclass
class Measured:
    seconds: float
    peak_process_mb: float
    peak_tree_mb: float
    returncode: int


def measure(args: list[str], log: Path | None = None, env: dict | None = None, cwd: Path | None = None) -> Measured:
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with PeakWatch(proc.pid, interval=0.05) as watch:
            code = proc.wait()
        return Measured(time.perf_counter() - start, watch.process_mb, watch.tree_mb, code)
    finally:
        if log:
            out.close()


def write_json(path: Path, figures: dict) -> None:
    """A bench's figures, dated, for bench/readme_tables.py (the README's tables are generated, not typed)."""
    import datetime
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**figures, "date": datetime.date.today().isoformat()}, indent=1))
