"""Rules that give an attention its rotary table from the caller (a rule library: it defines no pack).

Code that builds the table inside the attention sizes it by the key length, which in a static decode graph is
SEQ + 1 (the padded history plus this token), so every step would take the padded end's position, and any
NTK scaling would switch on. The block contract hands each block this step's [cos, sin] rows instead.
`llama_remote_rules.RotaryFromKwargs` does this where the attention takes `**kwargs`; `RotaryFromCaller`
where a parameter has to be threaded through the block (Qwen-7B's first release).
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import contains

NO_SPACE = cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace(""))


def _with_last(items: list, new: cst.CSTNode) -> list:
    """`items` (parameters or call arguments) with `new` last, in the layout of the ones before it."""
    if not items:
        return [new]
    last = items[-1]
    items = [*items[:-1], last.with_changes(comma=items[-2].comma if len(items) > 1 else cst.Comma())]
    return [*items, new.with_changes(comma=last.comma)]


class RotaryFromCaller(Rule):
    """In an attention `forward` that computes `<table> = self.<module>(...)` and then applies it through
    `<apply>(...)` calls, those statements become `rotate` (a template; `{own}` is the original expression,
    for when no table is given, so eager torch computes what it did), and the forward gains `<table>=None`;
    the block forward calling `self.<caller>(...)` gains it too and passes it on, and the function `<apply>`
    gets `pair_branch` first, for the [cos, sin] pair the caller gives where it took angles."""

    name = "rotary-from-caller"

    def __init__(self, table: str, module: str, apply: str, caller: str, rotate: str, pair_branch: str) -> None:
        super().__init__()
        self.table, self.apply, self.rotate, self.pair_branch = table, apply, rotate, pair_branch
        self.own = m.SimpleStatementLine([m.Assign([m.AssignTarget(m.Name(table))], contains(m.Call(
            m.Attribute(m.Name("self"), m.Name(module)))))])
        self.apply_call = m.Call(m.Name(apply))
        self.caller = m.Call(m.Attribute(m.Name("self"), m.Name(caller)))
        self.param = cst.Param(cst.Name(table), default=cst.Name("None"), equal=NO_SPACE)
        self.anchor = f"`{table} = self.{module}(...)` then `{apply}(...)` in a forward"

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        body = list(updated.body.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.own)), None)
        last = max((i for i, s in enumerate(body) if m.findall(s, self.apply_call)), default=None)
        if updated.name.value != "forward" or at is None or last is None or last < at:
            return updated
        new = list(cst.parse_module(self.rotate.format(own=cst.Module([]).code_for_node(body[at].body[0].value))).body)
        new[0] = self.mark(new[0].with_changes(leading_lines=body[at].leading_lines),
                           f"this step's [cos, sin] from the caller, else the attention's own `{self.table}`")
        return updated.with_changes(params=self._with_param(updated.params),
                                    body=updated.body.with_changes(body=[*body[:at], *new, *body[last + 1:]]))

    def _with_param(self, params: cst.Parameters) -> cst.Parameters:
        return params.with_changes(params=_with_last(list(params.params), self.param))

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self.context.hits:
            return updated
        callers = m.FunctionDef(m.Name("forward"), body=contains(self.caller))
        return m.replace(updated, callers | m.FunctionDef(m.Name(self.apply)), lambda node, _: (
            self._pair(node) if node.name.value == self.apply else self._thread(node)))

    def _pair(self, fn: cst.FunctionDef) -> cst.FunctionDef:
        pair = self.mark(cst.parse_statement(self.pair_branch), "takes the pair a patched attention passes",
                         same_site=True)
        return fn.with_changes(body=fn.body.with_changes(body=[pair, *fn.body.body]))

    def _thread(self, fn: cst.FunctionDef) -> cst.FunctionDef:
        arg = cst.Arg(cst.Name(self.table), keyword=cst.Name(self.table), equal=NO_SPACE)
        add = lambda call, _: call.with_changes(args=_with_last(list(call.args), arg))  # noqa: E731
        body = [self.mark(m.replace(s, self.caller, add), f"passes the caller's `{self.table}` on", same_site=True)
                if m.findall(s, self.caller) else s for s in fn.body.body]
        return fn.with_changes(params=self._with_param(fn.params), body=fn.body.with_changes(body=body))
