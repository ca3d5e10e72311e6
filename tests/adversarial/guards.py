"""Assertions of the adversarial suite: one-line errors, and trees that must not change."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_line_error(self, *needles: str) -> None:
        """Exit 2, no traceback, and the error is one line containing every needle."""
        assert self.code == 2, (self.code, self.err)
        assert "Traceback" not in self.err + self.out, self.err
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        assert len(lines) == 1, self.err
        for needle in needles:
            assert needle in self.err, (needle, self.err)


def tree_hash(path: Path) -> str:
    """Names, link targets and contents of everything under `path` (not following links out)."""
    digest = hashlib.sha256()
    for entry in sorted(path.rglob("*")) if path.exists() else []:
        digest.update(str(entry.relative_to(path)).encode())
        if entry.is_symlink():
            digest.update(b"->" + os.readlink(entry).encode())
        elif entry.is_file():
            digest.update(entry.read_bytes())
    return digest.hexdigest()


class Guard:
    """Hashes of the trees that must not change (the input, a sentinel beside it) before and after."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.before = [tree_hash(p) for p in paths]

    def unchanged(self) -> None:
        assert [tree_hash(p) for p in self.paths] == self.before, "an input or a bystander changed"
