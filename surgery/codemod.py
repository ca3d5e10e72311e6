"""The patch engine: a patch is a list of libcst rules tried in order; each run reports one outcome.

A rule is a libcst transformer that finds its anchor with `libcst.matchers`. The first rule whose
anchor matches rewrites the module and every statement it touched carries a marker comment
(`# surgery: <pack>/<patch>`), which is how a second run knows the patch is already applied.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import libcst as cst

MARKER_PREFIX = "# surgery: "


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    ALREADY_APPLIED = "already applied"
    NOT_APPLICABLE = "not applicable"
    ANCHOR_NOT_FOUND = "anchor not found"


class Rule(cst.CSTTransformer):
    """One way to find and rewrite a patch's target. Subclasses set `name`, `anchor`, and count `hits`."""

    name: str = ""
    anchor: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0
        self.marker = ""

    def run(self, module: cst.Module, marker: str) -> cst.Module | None:
        """The rewritten module, or None when the anchor is not in it."""
        self.hits, self.marker = 0, marker
        new = module.visit(self)
        return new if self.hits else None

    def mark(self, stmt: cst.BaseStatement, note: str = "") -> cst.BaseStatement:
        """Prefix a statement with the patch's marker comment (and why), counting one hit."""
        self.hits += 1
        text = f"{MARKER_PREFIX}{self.marker}" + (f": {note}" if note else "")
        return stmt.with_changes(leading_lines=[*stmt.leading_lines, cst.EmptyLine(comment=cst.Comment(text))])


@dataclass(frozen=True)
class Patch:
    """A named rewrite of one file. `required` patches abort the apply when no rule's anchor is found."""

    id: str
    summary: str
    rules: Sequence[Rule]
    required: bool = True
    absent_reason: str = "this revision has no such code"


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
    """Apply one patch to a parsed module; return the new module and what happened."""
    marker = f"{pack}/{patch.id}"
    if marker in present:
        return module, PatchResult(patch.id, filename, Outcome.ALREADY_APPLIED, detail="marker found")
    for rule in patch.rules:
        new = rule.run(module, marker)
        if new is not None:
            return new, PatchResult(patch.id, filename, Outcome.APPLIED, rule=rule.name,
                                    detail=f"{rule.hits} site(s)")
    anchors = [f"{rule.name}: {rule.anchor}" for rule in patch.rules]
    if patch.required:
        return module, PatchResult(patch.id, filename, Outcome.ANCHOR_NOT_FOUND,
                                   detail="; ".join(anchors), anchors=anchors)
    return module, PatchResult(patch.id, filename, Outcome.NOT_APPLICABLE, detail=patch.absent_reason)
