"""The patch engine: outcomes, idempotence through markers, rules made per run, and the contract it enforces
(marking is the only way to count; an `applied` without the marker is refused). The rules themselves have
exact before/after tests in tests/test_rules_*.py; the last tests here check that every rule has one."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from functools import partial
from pathlib import Path

import libcst as cst
import pytest

import surgery.patches
from surgery.codemod import Outcome, Patch, Rule, RuleContext, RuleError, markers, run_patch
from surgery.codemod_testing import assert_rule
from surgery.packs import RULES_SUFFIX, Pack
from surgery.patches.common_rules import ForceModuleConstant, prune_dead_assignments

FLAG = partial(ForceModuleConstant, "FLAG", "False")


def test_prune_keeps_names_still_read():
    body = cst.parse_module("a = 1\nb = a\nc = 2\nuse(c)\n").body
    kept = prune_dead_assignments(body, {"a", "b", "c"})
    assert [cst.Module([]).code_for_node(s).strip() for s in kept] == ["c = 2", "use(c)"]


@pytest.mark.parametrize("required,expected", [(True, Outcome.ANCHOR_NOT_FOUND), (False, Outcome.NOT_APPLICABLE)])
def test_run_patch_outcomes(required, expected):
    module = cst.parse_module("x = 1\n")
    patch = Patch("flag", "force FLAG", [FLAG], required=required, absent_reason="no FLAG here")
    _, result = run_patch(patch, "p", "m.py", module, markers(module))
    assert result.outcome is expected
    if required:
        assert result.detail == "module-constant: a module-level assignment `FLAG = ...`"
    else:
        assert result.detail == "no FLAG here"


def test_run_patch_is_idempotent_through_markers():
    module = cst.parse_module("FLAG = True\n")
    patch = Patch("flag", "force FLAG", [FLAG])
    once, first = run_patch(patch, "p", "m.py", module, markers(module))
    twice, second = run_patch(patch, "p", "m.py", once, markers(once))
    assert (first.outcome, second.outcome) == (Outcome.APPLIED, Outcome.ALREADY_APPLIED)
    assert (first.rule, first.detail) == ("module-constant", "1 site(s)")
    assert twice.code == once.code


def test_patch_holds_factories_and_makes_a_fresh_rule_per_run():
    made = []

    def factory() -> Rule:
        made.append(FLAG())
        return made[-1]

    patch = Patch("flag", "force FLAG", [factory])
    assert [(r.name, r.anchor) for r in patch.rules] == [("module-constant", "a module-level assignment `FLAG = ...`")]
    for _ in range(2):
        module = cst.parse_module("FLAG = True\n")
        run_patch(patch, "p", "m.py", module, markers(module))
    assert len(made) == 3 and len({id(r) for r in made}) == 3  # the probe for name/anchor, then one per run


def test_patch_refuses_rule_instances():
    with pytest.raises(TypeError, match="rule factories"):
        Patch("flag", "force FLAG", [FLAG()])


def test_a_rule_runs_once():
    rule = FLAG()
    rule.run(cst.parse_module("FLAG = 1\n"), RuleContext("p/x", "a.py"))
    with pytest.raises(RuleError, match="already ran on a.py"):
        rule.run(cst.parse_module("FLAG = 1\n"), RuleContext("p/x", "b.py"))


class _Unmarked(Rule):
    """A broken rule: it counts a site through `mark` but returns the statement without the marker."""

    name = "unmarked"
    anchor = "`x = ...`"

    def leave_SimpleStatementLine(self, original, updated):
        self.mark(updated)
        return updated.with_changes(body=[cst.parse_statement("x = 2\n").body[0]])


def test_engine_refuses_an_applied_without_marker():
    module = cst.parse_module("x = 1\n")
    with pytest.raises(RuleError) as err:
        run_patch(Patch("set-x", "x = 2", [_Unmarked]), "pk", "m.py", module, markers(module))
    assert str(err.value).startswith("pack pk, patch set-x, rule 'unmarked': rewrote m.py but left no "
                                     "`# surgery: pk/set-x` comment")


class _TwoMarksOneSite(Rule):
    name = "two-marks"

    def leave_SimpleStatementLine(self, original, updated):
        return self.mark(self.mark(updated, "first"), "same call", same_site=True)


def test_marks_count_sites():
    module = cst.parse_module("a = 1\nb = 2\n")
    new, result = run_patch(Patch("m", "mark", [_TwoMarksOneSite]), "p", "m.py", module, set())
    assert result.detail == "2 site(s)"
    assert new.code.count("# surgery: p/m") == 4


def test_assert_rule_reports_the_difference():
    with pytest.raises(AssertionError, match="rewrote the snippet differently"):
        assert_rule(FLAG, "FLAG = 1\n", "FLAG = False\n")  # the marker is part of the exact code
    with pytest.raises(AssertionError, match="found an anchor where none was expected"):
        assert_rule(FLAG, "FLAG = 1\n", None)
    with pytest.raises(AssertionError, match="anchor not found"):
        assert_rule(FLAG, "OTHER = 1\n", "OTHER = 1\n")


def _rule_libraries() -> list:
    return [importlib.import_module(f"surgery.patches.{i.name}") for i in pkgutil.iter_modules(surgery.patches.__path__)
            if i.name.endswith(RULES_SUFFIX)]


def test_pack_modules_and_rule_libraries_are_apart():
    """Every module in patches/ is a pack (defines PACK) or a rule library (`*_rules.py`, no PACK)."""
    for info in pkgutil.iter_modules(surgery.patches.__path__):
        module = importlib.import_module(f"surgery.patches.{info.name}")
        is_pack = isinstance(getattr(module, "PACK", None), Pack)
        assert is_pack != info.name.endswith(RULES_SUFFIX), info.name


def test_every_rule_has_an_exact_test():
    """Each public Rule class of a rule library is the factory (or inside the `partial`) of some
    `assert_rule(...)` in tests/test_rules_*.py, directly or through a `NAME = partial(Rule, ...)` alias."""
    rules = {cls.__name__ for module in _rule_libraries() for cls in vars(module).values()
             if inspect.isclass(cls) and issubclass(cls, Rule) and cls.__module__ == module.__name__
             and not cls.__name__.startswith("_")}
    tested = set()
    for path in Path(__file__).parent.glob("test_rules_*.py"):
        text = path.read_text()
        aliases = dict(re.findall(r"^(\w+) = partial\((\w+)", text, re.M))
        tested |= {aliases.get(n, n) for n in re.findall(r"assert_rule\(\s*(?:partial\()?(\w+)", text)}
    assert len(rules) == 36 and not rules - tested, f"rules without an exact test: {sorted(rules - tested)}"
