"""Vocabulary tables: written once, chunk by chunk, straight from the checkpoint into a raw data file.

At real sizes the tables are the largest tensors by far (151936 x 4096 is 2.5 GB in fp32), so export never
holds one whole: graphs that use a table (`embedding`, `embedding_cache`, `lm_head`) are traced with a
few-row stand-in and then point at the table's file, which every graph using the same checkpoint tensor
shares (a tied head reads the embedding's table). The file is plain row-major data at offset 0, the same
layout as the host-side `--embedding-disk` table.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.export.weights import SafetensorsIndex

ROWS_PER_CHUNK = 4096
STANDIN_ROWS = 16  # rows of the stand-in table a graph is traced with


@dataclass(frozen=True)
class Table:
    """One checkpoint tensor stored as a raw table file."""

    key: str  # checkpoint tensor name
    file: str  # file name in the export directory
    dtype: torch.dtype
    shape: tuple[int, ...]
    # applied to each chunk of rows (in fp32) before it is converted and stored: ArchSpec.head_rows
    fold: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    def rows(self, chunk: torch.Tensor) -> torch.Tensor:
        """Checkpoint rows as this table stores them: folded if it folds, then in its dtype."""
        return (chunk if self.fold is None else self.fold(chunk.float())).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.finfo(self.dtype).bits // 8


def write_table(index: SafetensorsIndex, table: Table, out: Path,
                progress: Callable[[int, int], None] = lambda done, total: None) -> str:
    """Convert `table.key` to `table.dtype` (round to nearest even) chunk by chunk into `out/table.file`,
    atomically; return its sha256."""
    path = out / table.file
    tmp = path.with_name(f".{path.name}.tmp")
    rows, digest = table.shape[0], hashlib.sha256()
    try:
        with open(tmp, "wb") as fh:
            for start, chunk in zip(range(0, rows, ROWS_PER_CHUNK), row_chunks(index, table), strict=True):
                raw = chunk.contiguous().view(torch.int16) if table.dtype == torch.bfloat16 else chunk.contiguous()
                data = memoryview(raw.numpy()).cast("B")
                fh.write(data)
                digest.update(data)
                progress(min(start + ROWS_PER_CHUNK, rows), rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def standin(table: Table, dtype: torch.dtype) -> torch.Tensor:
    """What a graph is traced with in place of the table: same columns, the graph's dtype, a few zero rows."""
    return torch.zeros(STANDIN_ROWS, *table.shape[1:], dtype=dtype)


def rows_for_ids(index: SafetensorsIndex, table: Table, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The table rows a batch of ids uses, and the ids renumbered into those rows (for references that
    must not load the whole table)."""
    unique, remapped = torch.unique(ids.long(), return_inverse=True)
    rows = table.rows(torch.cat([index.rows(table.key, int(i), int(i) + 1) for i in unique]))
    return rows, remapped.to(ids.dtype)


def row_chunks(index: SafetensorsIndex, table: Table, rows: int = ROWS_PER_CHUNK) -> Iterator[torch.Tensor]:
    """The table in consecutive row chunks, converted to its stored dtype (round to nearest even). Each chunk
    is read through its own handle: safetensors maps the file, and one mapping kept open across the table
    leaves every page read so far resident (measured: +650 MB of RSS for a 151936 x 2048 bf16 table)."""
    for start in range(0, table.shape[0], rows):
        with index.open(table.key) as source:
            chunk = source[start:min(start + rows, table.shape[0])]
        yield table.rows(chunk)
