"""What a patch pack is, and the registry that finds every pack in `surgery.patches`."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

from surgery.codemod import Patch
from surgery.errors import SurgeryError


@dataclass(frozen=True)
class ApplyOptions:
    """User choices that a pack turns into config edits."""

    seq_length: int | None = None
    dtype: str | None = None  # fp32 | fp16 | bf16; None keeps the model's own setting
    only: tuple[str, ...] = ()  # patch ids to run (all when empty)
    skip: tuple[str, ...] = ()  # patch ids not to run

    def as_dict(self) -> dict:
        return {"seq_length": self.seq_length, "dtype": self.dtype, "only": list(self.only), "skip": list(self.skip)}


@dataclass(frozen=True)
class Pack:
    """A short, declarative description of how to make one model family exportable."""

    name: str
    version: str
    summary: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    files: Mapping[str, Sequence[Patch]]
    config_edits: Callable[[ApplyOptions], Mapping[str, object]]
    checked_with: str  # the transformers versions the pack was checked against, e.g. ">=5.0,<6"
    load_only: tuple[str, ...] = ()  # patches that only make the unchanged model load on this transformers
    # files taken from the installed transformers package (path inside it) when the model dir has none
    sources: Mapping[str, str] = field(default_factory=dict)


@cache
def all_packs() -> dict[str, Pack]:
    """Every module in `surgery.patches` that defines `PACK`, by pack name."""
    import surgery.patches as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        pack = getattr(module, "PACK", None)
        if isinstance(pack, Pack):
            found[pack.name] = pack
    return dict(sorted(found.items()))


def pack_for_model_type(model_type: str) -> Pack | None:
    return next((p for p in all_packs().values() if model_type in p.model_types), None)


def get_pack(name: str) -> Pack:
    packs = all_packs()
    if name not in packs:
        raise SurgeryError(f"no pack named {name!r}; available: {', '.join(packs)} (see `surgery list`)")
    return packs[name]
