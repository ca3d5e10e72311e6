"""A checkpoint index in which some tensors are computed from others (dequantized, LoRA-merged).

Everything that streams weights (Resident, the vocabulary tables, verify's references) talks to an index
through `files`, `read`, `shape`, `rows` and `open`. Wrapping the plain SafetensorsIndex keeps that single
interface: a subclass names the tensors it derives and how to compute one, and the rest reads through. Each
derived tensor is computed when asked for and not kept, so memory stays one module's worth.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from surgery.export.weights import SafetensorsIndex


class DerivedIndex:
    """Reads through to `base`, except for the names in `derived` (subclasses fill it and `derive`)."""

    def __init__(self, base: SafetensorsIndex | DerivedIndex) -> None:
        self.base = base
        self.derived: set[str] = set()
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    @functools.cached_property
    def files(self) -> dict[str, Path]:
        """Every readable name -> the file holding it (a derived name: the file of its first source); built
        once, after the subclass has filled `derived`."""
        return self.base.files | {name: self.source_file(name) for name in self.derived}

    def source_file(self, name: str) -> Path:
        return self.base.files[name]

    def derive(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def derived_shape(self, name: str) -> list[int]:
        """A derived tensor's shape; subclasses that know it from their sources override this, so asking
        for a 151936-row head's shape does not compute the head."""
        return list(self._whole(name).shape)

    def _whole(self, name: str) -> torch.Tensor:
        """The derived tensor, kept while the same name is asked for again: a vocabulary table is read in
        row chunks (export/tables.py), which must not recompute the whole table per chunk."""
        if self._last[0] != name:
            self._last = (None, None)  # the previous one is freed before the next is computed
            self._last = (name, self.derive(name))
        return self._last[1]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        self._last = (None, None)  # tables are done once layers load: a kept head would sit in memory
        names = set(names)
        out = self.base.read(names - self.derived)
        for name in sorted(names & self.derived):
            out[name] = self.derive(name)
        return out

    def shape(self, name: str) -> list[int]:
        return self.derived_shape(name) if name in self.derived else self.base.shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._whole(name)[start:stop].clone() if name in self.derived else self.base.rows(name, start, stop)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator:
        if name in self.derived:
            yield self._whole(name)
        else:
            with self.base.open(name) as view:
                yield view
