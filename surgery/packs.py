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


def closest_pack(model_type: str, config: dict) -> str:
    """The pack a new architecture most likely resembles: by model_type spelling, else by config shape
    (transformers-native decoders carry `num_key_value_heads`; the rest look like the remote-code qwen)."""
    import difflib

    by_type = {t: p.name for p in all_packs().values() for t in p.model_types}
    close = difflib.get_close_matches(model_type, list(by_type), n=1, cutoff=0.6)
    if close:
        return by_type[close[0]]
    return "llama" if "num_key_value_heads" in config else "qwen"


def resolve_pack(name: str, config: dict) -> Pack:
    """`auto` picks the pack from the config's model_type; anything else is looked up by name."""
    if name != "auto":
        return get_pack(name)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise SurgeryError("config.json has no model_type, so `auto` cannot pick a pack; name the pack "
                           "(see `surgery list`)")
    model_type = config["model_type"]
    pack = pack_for_model_type(model_type)
    if pack is None:
        like = closest_pack(model_type, config)
        raise SurgeryError(f"no pack handles model_type {model_type!r}; the closest is {like!r}: scaffold one with "
                           f"`surgery port {model_type} --like {like}`")
    return pack


MAX_SEQ_LENGTH = 32768  # a static [SEQ, SEQ] prefill mask alone is 4 GB in fp32 at 32768


def check_seq_length(seq: int, config: dict) -> None:
    """A static length this model can use: at least 2, at most its trained positions and MAX_SEQ_LENGTH."""
    limit = MAX_SEQ_LENGTH
    trained = [v for k in ("max_position_embeddings", "seq_length", "n_positions")
               if isinstance(v := config.get(k), int) and not isinstance(v, bool) and v > 0]
    if trained:
        limit = min(limit, max(trained))
    if not 2 <= seq <= limit:
        why = "the positions its config.json allows" if limit < MAX_SEQ_LENGTH else "static graphs"
        raise SurgeryError(f"--seq-length {seq} is out of range for this model: use 2 to {limit} ({why})")
