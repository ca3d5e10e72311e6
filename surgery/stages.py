"""Resumable stages: each writes its own directory; `convert.json` records what each finished stage was made
from (a key chained through the stages before it), its result, wall time and peak memory, so a rerun skips
the stages whose inputs did not change and redoes the first one that did, and everything after it."""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surgery.fsutil import atomic_write_json, sha256_text
from surgery.memwatch import PeakWatch


@dataclass
class Stage:
    name: str
    run: Callable[[Path], dict]
    inputs: dict  # what the stage is made from; a change reruns it and everything after


@dataclass
class StageRun:
    results: dict[str, dict]
    seconds: dict[str, float]
    peak_mb: dict[str, dict[str, float]]


def release_freed_memory() -> None:
    """Hand freed memory back to the system before a stage starts. glibc keeps freed heap for reuse, so a
    stage would otherwise start at the peak of what ran before it: at 7B the compile stage began at export's
    5 GB and, with the compiler workers beside it, the tree went past 6 GB."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # another C library: nothing to trim


def run_stages(stages: list[Stage], stages_dir: Path, state_path: Path, options: dict,
               progress: Callable[[str], None] = lambda name: None) -> StageRun:
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        done = state.get("stages", {}) if isinstance(state, dict) else {}
    except ValueError:
        done = {}  # a damaged record: every stage reruns
    run = StageRun({}, {}, {})
    key, stale = "", False
    for stage in stages:
        key = sha256_text(key + json.dumps(stage.inputs, sort_keys=True))
        dst = stages_dir / stage.name
        record = done.get(stage.name)
        if not stale and isinstance(record, dict) and record.get("key") == key and dst.exists():
            run.results[stage.name], run.seconds[stage.name] = record["result"], record["seconds"]
            run.peak_mb[stage.name] = record.get("peak_mb", {})
            continue
        stale = True
        progress(stage.name)
        shutil.rmtree(dst, ignore_errors=True)
        release_freed_memory()  # the stage before's, or the caller's (a test that built a model in-process)
        start = time.perf_counter()
        with PeakWatch() as watch:
            run.results[stage.name] = stage.run(dst)
        run.seconds[stage.name] = time.perf_counter() - start
        run.peak_mb[stage.name] = {"process": watch.process_mb, "tree": watch.tree_mb}
        done[stage.name] = {"key": key, "result": run.results[stage.name], "seconds": run.seconds[stage.name],
                            "peak_mb": run.peak_mb[stage.name]}
        atomic_write_json(state_path, {"options": options, "stages": done})
    return run
