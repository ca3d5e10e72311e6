"""Every chip adapter, declared once. The CLI, `convert`, `toolchain doctor`, help texts and the docs table
(`surgery chips`) are generated from this list: a new chip is one module plus one line here."""

from __future__ import annotations

import importlib

from surgery.compile.base import Adapter
from surgery.errors import SurgeryError

ADAPTERS = ("surgery.compile.sophgo", "surgery.compile.mnn", "surgery.compile.axera", "surgery.compile.onnx_copy")


def adapters() -> list[Adapter]:
    return [importlib.import_module(module).ADAPTER for module in ADAPTERS]


def all_chips() -> list[str]:
    return [chip for adapter in adapters() for chip in adapter.chips]


def adapter_for(chip: str) -> Adapter:
    for adapter in adapters():
        if chip in adapter.chips:
            return adapter
    raise SurgeryError(f"unknown chip {chip!r}; choose one of {', '.join(all_chips())} (see `surgery chips`)")


def runtime_for(backend: str):
    """The Runtime class that runs a compiled directory of this backend here, or None (board only)."""
    for adapter in adapters():
        if adapter.backend == backend and adapter.runtime:
            module, _, name = adapter.runtime.partition(":")
            return getattr(importlib.import_module(module), name)
    return None


def chips_table() -> str:
    """The docs table of adapters (docs/adapters.md holds the same text; a test keeps them equal)."""
    rows = ["| adapter | chips | toolchain | output | runs here with | loaded on the board by |",
            "|---|---|---|---|---|---|"]
    for a in adapters():
        here = "`surgery run`" if a.runtime else "-"
        rows.append(f"| {a.name} | {', '.join(a.chips)} | {a.toolchain or '-'} | {a.backend} | {here} | "
                    f"{a.loaded_by} |")
    return "\n".join(rows) + "\n"
