"""`assert_rule`: the exact before/after test every rule gets (pack authors use it for their own rules).

A rule is checked through the engine, not alone: the same factory a pack lists, run on a snippet as
`run_patch` runs it, so the test also proves what the engine demands (the marker is written, a rerun
says "already applied"). Comparing the exact code, marker comments included, names the rule that
changed; the conformance suite would only report a logits mismatch.
"""

from __future__ import annotations

import difflib
import textwrap
from collections.abc import Callable

import libcst as cst

from surgery.codemod import Outcome, Patch, Rule, markers, run_patch

PACK, PATCH = "test", "rule"  # the marker in expected code: `# surgery: test/rule: <note>`


def _text(source: str) -> str:
    """Triple-quoted snippets may start on the line after the quotes and be indented like the test."""
    return textwrap.dedent(source.removeprefix("\n"))


def _diff(want: str, got: str) -> str:
    return "".join(difflib.unified_diff(want.splitlines(keepends=True), got.splitlines(keepends=True),
                                        "expected", "rewritten"))


def _run(patch: Patch, source: str) -> tuple[str, Outcome]:
    module = cst.parse_module(source)
    new, result = run_patch(patch, PACK, "snippet.py", module, markers(module))
    return new.code, result.outcome


def assert_rule(rule: Callable[[], Rule], before: str, after: str | None) -> None:
    """Run the rule factory `rule` (a Rule class or functools.partial) on `before` and require exactly
    `after`, markers included; `after=None` requires that it finds no anchor and changes nothing.

    Both snippets are dedented (and may start with a newline). A rewrite must also survive printing and
    parsing and then report `already applied`, as a second `surgery apply` would.
    """
    patch = Patch(PATCH, "the rule under test", [rule])
    name = patch.rules[0].name
    source = _text(before)
    got, outcome = _run(patch, source)
    if after is None:
        if outcome is not Outcome.ANCHOR_NOT_FOUND or got != source:
            raise AssertionError(f"rule {name!r} found an anchor where none was expected ({outcome}):\n"
                                 + _diff(source, got))
        return
    want = _text(after)
    if outcome is not Outcome.APPLIED:
        raise AssertionError(f"rule {name!r}: {outcome} in\n{source}")
    if got != want:
        raise AssertionError(f"rule {name!r} rewrote the snippet differently:\n" + _diff(want, got))
    again, outcome = _run(patch, got)
    if outcome is not Outcome.ALREADY_APPLIED or again != got:
        raise AssertionError(f"rule {name!r}: a rerun on its own output reports {outcome!s}, not already applied")
