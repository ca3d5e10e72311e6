"""What a patch pack is, and the registry that finds every pack: the modules of `surgery.patches` that
define `PACK`, then the `surgery.packs` entry points of other installed distributions.

`surgery.patches` holds two kinds of modules, told apart by name: pack modules (`qwen.py`, `llama.py`,
one per family, each defining `PACK`) and rule libraries (`*_rules.py`: rules, matchers, pack factories),
which the registry never imports. A pack kept in a user's own package is found through an entry point
(as pytest finds plugins), so `surgery list` / `apply` see it from a pip-installed surgery too.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import TYPE_CHECKING

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from surgery.codemod import Patch
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.export.arch import ArchSpec

ENTRY_POINT_GROUP = "surgery.packs"
RULES_SUFFIX = "_rules"  # rule libraries in surgery.patches: never a pack
log = logging.getLogger(__name__)


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
    """A short, declarative description of how to make one model family exportable: its patches, its
    config edits, and (for `surgery export`) where the patched model keeps its pieces."""

    name: str
    version: str
    summary: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    files: Mapping[str, Sequence[Patch]]
    config_edits: Callable[[ApplyOptions], Mapping[str, object]]
    checked_with: str  # transformers versions the pack was checked against (a specifier, e.g. ">=5.0,<6")
    load_only: tuple[str, ...] = ()  # patches that only make the unchanged model load on this transformers
    # files taken from the installed transformers package (path inside it) when the model dir has none
    sources: Mapping[str, str] = field(default_factory=dict)
    export_spec: ArchSpec | None = None  # None: the pack's output cannot be exported yet
    # refuses (SurgeryError, one line saying what to do) a config.json whose model the patches cannot make
    # static, e.g. an option that adds inputs the block contract has no place for; runs before any patch
    check_config: Callable[[Mapping[str, object]], None] | None = None

    def __post_init__(self) -> None:
        try:
            SpecifierSet(self.checked_with)
        except InvalidSpecifier:
            raise ValueError(f"pack {self.name!r}: checked_with {self.checked_with!r} is not a version "
                             "specifier such as '>=5.0,<6'") from None


def _builtin_packs() -> Iterator[Pack]:
    """`PACK` of every pack module in `surgery.patches`. Rule libraries are skipped unimported; any other
    module without PACK (a file left over from an older install) is ignored, not fatal: tests hold the
    layout (tests/test_codemods.py)."""
    import surgery.patches as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith(RULES_SUFFIX) or info.name.startswith("_"):
            continue
        pack = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "PACK", None)
        if isinstance(pack, Pack):
            yield pack


def _load_entry_point(entry) -> Pack:
    loaded = entry.load()
    pack = loaded if isinstance(loaded, Pack) else getattr(loaded, "PACK", None)
    if not isinstance(pack, Pack):
        raise TypeError(f"{entry.value} is neither a Pack nor a module defining PACK")
    return pack


def _entry_point_packs() -> Iterator[tuple[str, Pack]]:
    """Packs other distributions declare under `[project.entry-points."surgery.packs"]`, with the entry
    point that named each; a broken one costs a one-line warning, never the command."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            yield entry.value, _load_entry_point(entry)
        except Exception as exc:  # any import-time failure of foreign code
            first = (str(exc).strip().splitlines() or [""])[0]
            log.warning("warning: pack entry point %r (%s) skipped: %s%s", entry.name, entry.value,
                        type(exc).__name__, f": {first}" if first else "")


@cache
def all_packs() -> dict[str, Pack]:
    """Every pack by name: built-ins first, then entry points (which cannot replace a pack by name)."""
    found = {pack.name: pack for pack in _builtin_packs()}
    for where, pack in _entry_point_packs():
        if pack.name in found:
            log.warning("warning: pack entry point %s skipped: a pack named %r is already known", where, pack.name)
            continue
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


def installed_transformers() -> str | None:
    """The installed transformers version, read from its metadata (importing it would cost seconds)."""
    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


_warned: set[tuple[str, str, str]] = set()


def check_transformers(pack: Pack) -> None:
    """Warn (once per process, i.e. per command) when the installed transformers is outside the range the
    pack was checked with: its patches may then miss anchors or rewrite code they were not written for."""
    installed = installed_transformers()
    if installed is None or SpecifierSet(pack.checked_with).contains(installed, prereleases=True):
        return
    key = (pack.name, pack.checked_with, installed)
    if key not in _warned:
        _warned.add(key)
        log.warning("warning: pack %r was checked with transformers %s, but %s is installed; check the result "
                    "(the conformance test) or install a checked version", pack.name, pack.checked_with, installed)


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
