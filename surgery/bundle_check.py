"""Nothing read from a bundle is trusted before it is checked.

A manifest names files (graphs, their weights, tokenizer files, the host embedding table). Before any
command opens one, each name must be a plain relative path that stays inside the bundle (no `..`, no
absolute path, no symlink leading out), and each graph must match the sha256 the manifest recorded: a
graph copied over another, truncated or replaced is refused in one line naming it. Weight files up to
HASH_DATA_BELOW bytes are hashed too; larger ones (GBs at 7B, hashed when they were written) are checked
by size here, and by hash in `surgery verify`.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file

HASH_DATA_BELOW = 64 << 20


def member(directory: Path, name: object, what: str) -> Path:
    """`directory / name` when `name` is a relative path that resolves inside `directory`."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise SurgeryError(f"the manifest in {directory} names an invalid file for {what} ({name!r}); "
                           "re-run the stage that wrote it")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise SurgeryError(f"the manifest in {directory} points {what} outside the bundle ({name}); refusing to "
                           "read it")
    path = directory / pure
    root = directory.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise SurgeryError(f"{what} in {directory} ({name}) is a link leading outside the bundle; refusing to read "
                           "it")
    return path


def check_files(directory: Path, manifest) -> None:
    """Every file the manifest names: inside the bundle, present, graphs (and small weights) as recorded."""
    local = manifest.backend in ("onnxruntime", "mnn", "bmodel")  # an Axera kit's graphs live in its build dir
    hashed: dict[Path, str] = {}  # a combined bmodel holds every graph: hash each file once
    for g in manifest.graphs:
        path = member(directory, g.file, f"graph {g.name}")
        data = member(directory, g.data_file, f"the weights of graph {g.name}") if g.data_file else None
        if not local:
            continue
        if not path.is_file():
            raise SurgeryError(f"graph {g.name}: {g.file} is missing from {directory}; re-run the stage that wrote it")
        if path not in hashed:
            hashed[path] = sha256_file(path)
        if hashed[path] != g.sha256:
            raise SurgeryError(f"graph {g.name}: {g.file} does not match the manifest (sha256); it was changed or "
                               "replaced after it was written: re-run the stage that wrote it")
        if data is not None:
            _check_data(g.name, data, g.data_sha256)
    for name in manifest.tokenizer_files:
        member(directory, name, "a tokenizer file")
    if manifest.embedding_file:
        table = member(directory, manifest.embedding_file.get("file"), "the embedding table")
        shape = manifest.embedding_file.get("shape") or [0, 0]
        if table.is_file() and table.stat().st_size != int(shape[0]) * int(shape[1]) * 2:
            raise SurgeryError(f"the embedding table {table.name} has the wrong size for {shape} bf16; re-export it")


def _check_data(graph: str, path: Path, sha: str | None) -> None:
    if not path.is_file():
        raise SurgeryError(f"graph {graph}: its weights {path.name} are missing; re-run the stage that wrote them")
    if sha and os.path.getsize(path) < HASH_DATA_BELOW and sha256_file(path) != sha:
        raise SurgeryError(f"graph {graph}: its weights {path.name} do not match the manifest (sha256); re-run the "
                           "stage that wrote them")
