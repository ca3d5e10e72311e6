"""Replacing graphs and the manifest that vouches for them, as one step that survives kill -9.

A stage that rewrites graphs in place (optimize) must never leave a directory whose files disagree with
its manifest. It writes each new graph beside the old one, then a journal naming the moves and the new
hashes, then moves and rewrites the manifest, then drops the journal. A run killed anywhere in between is
rolled forward by the next run before it reads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgery.bundle_check import member
from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json, sha256_file
from surgery.manifest import Manifest

JOURNAL = ".surgery-journal.json"


def commit(directory: Path, manifest: Manifest, moves: dict[str, Path], conventions: dict | None = None) -> None:
    """Replace the graphs named in `moves` (graph -> its new file, beside it) and update the manifest."""
    atomic_write_json(directory / JOURNAL, {
        "moves": {name: [tmp.name, sha256_file(tmp)] for name, tmp in moves.items()},
        "conventions": conventions or {},
    })
    _roll_forward(directory, manifest)


def recover(directory: Path) -> None:
    """Finish what a killed run journaled (nothing to do without a journal)."""
    if (directory / JOURNAL).is_file():
        _roll_forward(directory, Manifest.read(directory, check=False))


def _roll_forward(directory: Path, manifest: Manifest) -> None:
    try:
        journal = json.loads((directory / JOURNAL).read_text())
        moves = {str(k): (str(v[0]), str(v[1])) for k, v in journal["moves"].items()}
        conventions = dict(journal.get("conventions") or {})
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise SurgeryError(f"{directory / JOURNAL} is damaged; re-export this directory") from None
    for name, (tmp, digest) in moves.items():
        graph = manifest.graph(name)
        source, target = member(directory, tmp, f"graph {name}"), member(directory, graph.file, f"graph {name}")
        if source.is_file():
            os.replace(source, target)
        graph.sha256 = digest
    manifest.conventions.update(conventions)
    manifest.write(directory)
    (directory / JOURNAL).unlink()
