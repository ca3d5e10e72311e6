"""Rules many packs share (a rule library: it defines no pack). Each is a small libcst transformer with
its anchor spelled as matchers; packs list them as factories, e.g. `partial(ForceModuleConstant, "X", "0")`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule


def torch_call(fn: str, **kwargs: object) -> m.Call:
    """Matcher for `torch.<fn>(...)`."""
    return m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name(fn)), **kwargs)


def contains(matcher: m.BaseMatcherNode) -> m.MatchIfTrue:
    """Matches a node with `matcher` anywhere inside it."""
    return m.MatchIfTrue(lambda node: bool(m.findall(node, matcher)))


IS_NOT_NONE = m.ComparisonTarget(operator=m.IsNot(), comparator=m.Name("None"))


class ForceModuleConstant(Rule):
    """`NAME = <anything>` at module level becomes `NAME = <value>` (e.g. `SUPPORT_TORCH2 = False`)."""

    def __init__(self, name: str, value: str) -> None:
        super().__init__()
        self.target, self.value = name, value
        self.name = "module-constant"
        self.anchor = f"a module-level assignment `{name} = ...`"

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        pattern = m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name(self.target))])])
        body = []
        for stmt in updated.body:
            if m.matches(stmt, pattern):
                assign = stmt.body[0]
                stmt = self.mark(stmt.with_changes(body=[assign.with_changes(value=cst.parse_expression(self.value))]),
                                 f"was `{cst.Module([]).code_for_node(assign.value)}`")
            body.append(stmt)
        return updated.with_changes(body=body)


class KeepElseOfFlagBranch(Rule):
    """`if <test using FLAG>: A else: B` becomes `B`: drops a code path the flag selects (e.g. SDPA)."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag
        self._elifs: set[cst.If] = set()  # the nodes themselves (identity-hashed, kept alive): no reused ids
        self.name = "flag-branch"
        self.anchor = f"an `if ... {flag} ...: ... else: ...` statement"

    def visit_If(self, node: cst.If) -> None:
        if isinstance(node.orelse, cst.If):
            self._elifs.add(node.orelse)

    def _is_flag_branch(self, node: cst.CSTNode) -> bool:
        return m.matches(node, m.If(test=contains(m.Name(self.flag)), orelse=m.Else()))

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.FlattenSentinel:
        if original in self._elifs:  # an `elif`: its parent splices it out below
            return updated
        if self._is_flag_branch(updated.orelse):  # `if A: X elif FLAG: Y else: Z` -> `if A: X else: Z`
            return self.mark(updated.with_changes(orelse=updated.orelse.orelse), f"`{self.flag}` branch removed")
        if not self._is_flag_branch(updated):
            return updated
        kept = list(updated.orelse.body.body)
        kept[0] = self.mark(kept[0].with_changes(leading_lines=updated.leading_lines),
                            f"`{self.flag}` branch removed")
        return cst.FlattenSentinel(kept)


class ScalarDivision(Rule):
    """`x / torch.full([], s, ...)` becomes `x / (s)`: the 0-d tensor breaks ONNX shape inference."""

    name = "full-divisor"
    anchor = "`<expr> / torch.full([], <scalar>, ...)`"
    DIVISION = m.BinaryOperation(operator=m.Divide(),
                                 right=torch_call("full", args=[m.Arg(m.List(elements=[])), m.Arg(),
                                                                m.ZeroOrMore()]))

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.DIVISION):
            return updated
        new = m.replace(updated, self.DIVISION, lambda node, _: node.with_changes(
            right=node.right.args[1].value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])))
        return self.mark(new, "plain scalar division")


class HoistBefore(Rule):
    """Move the statement matching `moved` in front of the statement matching `before` in the same block.

    Used to take `present = (key, value)` before the concatenation with the cache, so a block
    returns only this step's K/V.
    """

    def __init__(self, moved: m.BaseMatcherNode, before: m.BaseMatcherNode, name: str, anchor: str,
                 note: str) -> None:
        super().__init__()
        self.moved, self.before, self.note = moved, before, note
        self.name, self.anchor = name, anchor

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        first = next((i for i, s in enumerate(body) if m.matches(s, self.before)), None)
        later = next((i for i, s in enumerate(body) if m.matches(s, self.moved)), None)
        if first is None or later is None or later < first:
            return updated
        stmt = body.pop(later)
        body.insert(first, self.mark(stmt.with_changes(leading_lines=[cst.EmptyLine(indent=False)]), self.note))
        return updated.with_changes(body=body)


class ReplaceMethodCall(Rule):
    """`self.<method>(args...)` becomes an expression template over the call's arguments ({0}, {1}, ...)."""

    def __init__(self, method: str, template: str, note: str) -> None:
        super().__init__()
        self.method, self.template, self.note = method, template, note
        self.name = "replace-call"
        self.anchor = f"a call `self.{method}(...)`"
        self.call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(method)))

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.call):
            return updated

        def rewrite(node: cst.Call, _: object) -> cst.BaseExpression:
            args = [cst.Module([]).code_for_node(a.value) for a in node.args]
            return cst.parse_expression(self.template.format(*args))

        return self.mark(m.replace(updated, self.call, rewrite), self.note)


class CallFirstInMethod(Rule):
    """Insert `<helper>(<arg>)` as the first statement of `<cls>.<method>` and define `helper` at module end."""

    def __init__(self, cls: str, method: str, helper_source: str, call: str, note: str) -> None:
        super().__init__()
        self.cls, self.method, self.call, self.note = cls, method, call, note
        self.helper = cst.parse_module(helper_source).body
        self.name = "call-first"
        self.anchor = f"a method `{cls}.{method}`"
        self._inserted = False  # this run added the call, so the module end gets the helper

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if updated.name.value != self.cls:
            return updated
        body = []
        for stmt in updated.body.body:
            if m.matches(stmt, m.FunctionDef(name=m.Name(self.method))):
                inner = list(stmt.body.body)
                at = 1 if inner and m.matches(inner[0], m.SimpleStatementLine([m.Expr(m.SimpleString())])) else 0
                inner.insert(at, self.mark(cst.parse_statement(self.call + "\n"), self.note))
                stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
                self._inserted = True
            body.append(stmt)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self._inserted:
            return updated
        helper = [self.mark(self.helper[0].with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()]),
                            self.note, same_site=True), *self.helper[1:]]  # the helper belongs to the call's site
        return updated.with_changes(body=[*updated.body, *helper])


# --- dead-assignment pruning, used after a rule removes the only reader of some names ---------

def _branches(stmt: cst.If) -> list[cst.CSTNode]:
    """The statements of every branch of an if (an `elif` counts as one nested statement)."""
    inner: list[cst.CSTNode] = list(stmt.body.body)
    if isinstance(stmt.orelse, cst.If):
        inner.append(stmt.orelse)
    elif stmt.orelse is not None:
        inner += list(stmt.orelse.body.body)
    return inner


def _assign_only_names(stmt: cst.CSTNode) -> set[str] | None:
    """Names a statement only assigns to (plain names, in every branch of an if), else None."""
    if isinstance(stmt, cst.SimpleStatementLine):
        names: set[str] = set()
        for small in stmt.body:
            if not isinstance(small, cst.Assign):
                return None
            for target in small.targets:
                parts = ([e.value for e in target.target.elements] if isinstance(target.target, cst.Tuple)
                         else [target.target])
                if not all(isinstance(p, cst.Name) for p in parts):
                    return None
                names |= {p.value for p in parts}
        return names
    if isinstance(stmt, cst.If):
        names = set()
        for inner in _branches(stmt):
            got = _assign_only_names(inner)
            if got is None:
                return None
            names |= got
        return names
    return None


def _loaded(stmt: cst.CSTNode, name: str) -> bool:
    """Whether a statement reads `name` (assignment targets do not count)."""
    if isinstance(stmt, cst.SimpleStatementLine) and all(isinstance(s, cst.Assign) for s in stmt.body):
        return any(m.findall(s.value, m.Name(name)) for s in stmt.body)
    if isinstance(stmt, cst.If) and _assign_only_names(stmt) is not None:
        return bool(m.findall(stmt.test, m.Name(name))) or any(_loaded(s, name) for s in _branches(stmt))
    return bool(m.findall(stmt, m.Name(name)))


def prune_dead_assignments(body: Sequence[cst.BaseStatement], names: Iterable[str]) -> list[cst.BaseStatement]:
    """Drop statements that only assign some of `names` when nothing else in `body` reads them."""
    names = set(names)
    stmts = list(body)
    changed = True
    while changed:
        changed = False
        for i, stmt in enumerate(stmts):
            assigned = _assign_only_names(stmt)
            if not assigned or not assigned <= names:
                continue
            others = stmts[:i] + stmts[i + 1:]
            if not any(_loaded(o, n) for o in others for n in assigned):
                del stmts[i]
                changed = True
                break
    return stmts
