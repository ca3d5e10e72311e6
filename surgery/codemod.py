"""The patch engine: a patch is a list of libcst rule factories tried in order; each run reports one outcome.

A rule is a libcst transformer that finds its anchor with `libcst.matchers`. A `Patch` holds factories,
not rules: the engine makes a fresh rule for every file it runs on, so no state (seen nodes, counts)
survives from one run to the next. The first rule whose anchor matches rewrites the module, and every
statement it touched carries a marker comment (`# surgery: <pack>/<patch>`), which is how a second run
knows the patch is already applied. Marking is the only way a rule counts a site, and the engine refuses
an `applied` whose output lacks the marker: a rerun would otherwise say "anchor not found".
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import libcst as cst

MARKER_PREFIX = "# surgery: "


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    ALREADY_APPLIED = "already applied"
    NOT_APPLICABLE = "not applicable"
    ANCHOR_NOT_FOUND = "anchor not found"


class RuleError(RuntimeError):
    """A rule broke the engine's contract: a bug in a pack, not a problem with the user's model."""


@dataclass
class RuleContext:
    """Where one rule runs, and what it has done there. `hits` changes only through `Rule.mark`."""

    marker: str  # `<pack>/<patch>`
    file: str
    hits: int = 0


class Rule(cst.CSTTransformer):
    """One way to find and rewrite a patch's target. Subclasses set `name` and `anchor`, and call `mark`
    on every statement they rewrite; a rule instance runs once (the engine makes one per file)."""

    name: str = ""
    anchor: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._context: RuleContext | None = None

    @property
    def context(self) -> RuleContext:
        if self._context is None:
            raise RuleError(f"rule {self.name!r} is not running: only the engine calls its visitor methods")
        return self._context

    def run(self, module: cst.Module, context: RuleContext) -> cst.Module | None:
        """The rewritten module, or None when the anchor is not in it (no statement was marked)."""
        if self._context is not None:
            raise RuleError(f"rule {self.name!r} already ran on {self._context.file}; a Patch holds rule factories "
                            "and the engine makes a fresh rule for every file")
        self._context = context
        new = module.visit(self)
        return new if context.hits else None

    def mark(self, stmt: cst.BaseStatement, note: str = "", *, same_site: bool = False) -> cst.BaseStatement:
        """Prefix a statement with the patch's marker comment (and why), counting one site unless the
        statement belongs to a site already marked (`same_site`, e.g. a helper added for that call)."""
        context = self.context
        if not same_site:
            context.hits += 1
        text = f"{MARKER_PREFIX}{context.marker}" + (f": {note}" if note else "")
        return stmt.with_changes(leading_lines=[*stmt.leading_lines, cst.EmptyLine(comment=cst.Comment(text))])


@dataclass(frozen=True)
class RuleFactory:
    """How a `Patch` holds a rule: `make()` builds a fresh one; `name` and `anchor` describe it unrun."""

    make: Callable[[], Rule]
    name: str
    anchor: str

    @classmethod
    def of(cls, factory: Callable[[], Rule]) -> RuleFactory:
        """Wrap a Rule subclass or a `functools.partial` of one (its arguments bound)."""
        if isinstance(factory, RuleFactory):
            return factory
        if isinstance(factory, Rule):
            raise TypeError(f"a Patch takes rule factories (the Rule class, or functools.partial(RuleClass, ...)), "
                            f"not the rule instance {factory.name or type(factory).__name__!r}")
        if not callable(factory):
            raise TypeError(f"a Patch rule must be a Rule class or functools.partial of one, not {factory!r}")
        probe = factory()  # never run: it only tells the rule's name and anchor
        if not isinstance(probe, Rule):
            raise TypeError(f"rule factory {factory!r} made a {type(probe).__name__}, not a Rule")
        return cls(factory, probe.name, probe.anchor)

    def __call__(self) -> Rule:
        return self.make()


@dataclass(frozen=True)
class Patch:
    """A named rewrite of one file. `required` patches abort the apply when no rule's anchor is found.

    `rules` are factories (Rule classes or `functools.partial`s), tried in order; they are stored as
    `RuleFactory`s, which also tell each rule's name and anchor without running it.
    """

    id: str
    summary: str
    rules: Sequence[Callable[[], Rule]]
    required: bool = True
    absent_reason: str = "this revision has no such code"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(RuleFactory.of(f) for f in self.rules))


@dataclass
class PatchResult:
    patch: str
    file: str
    outcome: Outcome
    rule: str | None = None
    detail: str = ""
    anchors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"patch": self.patch, "file": self.file, "outcome": str(self.outcome),
                "rule": self.rule, "detail": self.detail}


class _Comments(cst.CSTVisitor):
    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_Comment(self, node: cst.Comment) -> None:
        if node.value.startswith(MARKER_PREFIX):
            self.found.add(node.value[len(MARKER_PREFIX):].split(":")[0].strip())


def markers(module: cst.Module) -> set[str]:
    """The `<pack>/<patch>` markers present in a module."""
    visitor = _Comments()
    module.visit(visitor)
    return visitor.found


def run_patch(patch: Patch, pack: str, filename: str, module: cst.Module,
              present: set[str]) -> tuple[cst.Module, PatchResult]:
    """Apply one patch to a parsed module; return the new module and what happened.

    Raises RuleError when a rule reports a rewrite but its output carries no marker for the patch.
    """
    marker = f"{pack}/{patch.id}"
    if marker in present:
        return module, PatchResult(patch.id, filename, Outcome.ALREADY_APPLIED, detail="marker found")
    for factory in patch.rules:
        context = RuleContext(marker, filename)
        new = factory().run(module, context)
        if new is None:
            continue
        if marker not in markers(new):
            raise RuleError(f"pack {pack}, patch {patch.id}, rule {factory.name!r}: rewrote {filename} but left no "
                            f"`{MARKER_PREFIX}{marker}` comment, so a rerun could not tell it is applied")
        return new, PatchResult(patch.id, filename, Outcome.APPLIED, rule=factory.name,
                                detail=f"{context.hits} site(s)")
    anchors = [f"{factory.name}: {factory.anchor}" for factory in patch.rules]
    if patch.required:
        return module, PatchResult(patch.id, filename, Outcome.ANCHOR_NOT_FOUND,
                                   detail="; ".join(anchors), anchors=anchors)
    return module, PatchResult(patch.id, filename, Outcome.NOT_APPLICABLE, detail=patch.absent_reason)
