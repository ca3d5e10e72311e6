"""Peak memory of a process tree, sampled from /proc: what a stage really costs, workers included.

`ru_maxrss` only knows one process; a stage that runs compilers as subprocesses needs the sum over the tree.
`convert` records each stage's peak with this, and the benches measure other tools the same way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_mb(pid: int) -> float:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_rss(root: int) -> tuple[float, float]:
    """(largest process, sum over the tree) resident memory in MB of `root` and its descendants."""
    tree, stack, sizes = _children(), [root], []
    while stack:
        pid = stack.pop()
        sizes.append(_rss_mb(pid))
        stack.extend(tree.get(pid, []))
    return max(sizes, default=0.0), sum(sizes)


class PeakWatch:
    """Samples the tree under `pid` (default: this process) every `interval` seconds while active. A sample
    reads every process's /proc entry (this kernel has no /proc/PID/task/TID/children): a few ms, so not more
    often than a peak of interest lasts (loading a table: seconds)."""

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        self.pid, self.interval = pid or os.getpid(), interval
        self.process_mb = self.tree_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while True:
            one, total = tree_rss(self.pid)
            self.process_mb, self.tree_mb = max(self.process_mb, one), max(self.tree_mb, total)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakWatch:
        if Path("/proc").is_dir():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
