"""Rules for the ChatGLM2/3 remote code (a rule library: it defines no pack; `patches/chatglm.py` lists them).

That code masks with booleans (`masked_fill(mask, -inf)`), builds its own causal mask when none is passed,
and hands back the whole concatenated cache as `kv_cache`; the block contract needs an additive mask input,
no mask of the model's own, and only this step's K/V. It also predates transformers 5 (`config.max_length`,
no `post_init`). Each rule is matched with `libcst.matchers` and parameterised by the names it looks for.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import contains


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


def _is_none(name: str) -> m.Comparison:
    return m.Comparison(left=m.Name(name), comparisons=[m.ComparisonTarget(operator=m.Is(), comparator=m.Name("None"))])


class GuardConfigRead(Rule):
    """`<obj>.<attr>` becomes `getattr(<obj>, "<attr>", <default>)`: a config field transformers 5 dropped
    (generation settings such as `max_length` left PretrainedConfig) would otherwise fail the load."""

    def __init__(self, obj: str, attr: str, default: str) -> None:
        super().__init__()
        self.read = m.Attribute(value=m.Name(obj), attr=m.Name(attr))
        self.replacement = cst.parse_expression(f'getattr({obj}, "{attr}", {default})')
        self.attr = attr
        self.name = "guard-config-read"
        self.anchor = f"a read of `{obj}.{attr}`"

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.read):
            return updated
        new = m.replace(updated, self.read, self.replacement)
        return self.mark(new, f"transformers 5 configs have no `{self.attr}`")


class CallLastInMethod(Rule):
    """Append `<call>` to `<cls>.<method>` when the method does not make it yet (e.g. `self.post_init()`,
    which transformers 5 needs to finish a model it loads)."""

    def __init__(self, cls: str, method: str, call: str, note: str) -> None:
        super().__init__()
        self.cls, self.method, self.note = cls, method, note
        self.statement = cst.parse_statement(call + "\n")
        self.call = self.statement.body[0].value
        self.name = "call-last"
        self.anchor = f"a method `{cls}.{method}` that does not call `{call}`"

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if updated.name.value != self.cls:
            return updated
        same_call = m.MatchIfTrue(lambda node: isinstance(node, cst.Call) and node.deep_equals(self.call))
        body = []
        for stmt in updated.body.body:
            if m.matches(stmt, m.FunctionDef(name=m.Name(self.method))) and not m.findall(stmt, same_call):
                inner = [*stmt.body.body, self.mark(self.statement, self.note)]
                stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
            body.append(stmt)
        return updated.with_changes(body=updated.body.with_changes(body=body))


class DropMaskBuilder(Rule):
    """Remove `if <mask> is None ...: <mask> = ...; <mask>.tril_() ...`: a causal mask the attention builds
    when it is given none. Only the additive mask input may mask in a static graph, and a fresh mask per call
    is [SEQ, SEQ] of ops in every block."""

    def __init__(self, mask: str = "attention_mask") -> None:
        super().__init__()
        self.target = m.If(test=contains(_is_none(mask)),
                           body=contains(m.Call(func=m.Attribute(value=m.Name(mask), attr=m.Name("tril_")))))
        self.name = "drop-mask-builder"
        self.anchor = f"`if {mask} is None ...: ... {mask}.tril_() ...`"

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.target)), None)
        if at is None or at == len(body) - 1:
            return updated
        del body[at]
        body[at] = self.mark(body[at], "built-in causal mask removed; the attention_mask input masks")
        return updated.with_changes(body=body)


class AdditiveMask(Rule):
    """`x = x.masked_fill(<mask>, ...)` becomes `x = x + <mask>`: the mask input is additive (0 or -10000),
    which NPU compilers take as a plain Add; a boolean `masked_fill` needs Where and a bool input."""

    def __init__(self, mask: str = "attention_mask") -> None:
        super().__init__()
        self.mask = mask
        self.fill = m.Call(func=m.Attribute(attr=m.Name("masked_fill")), args=[m.Arg(m.Name(mask)), m.ZeroOrMore()])
        self.name = "masked-fill-to-add"
        self.anchor = f"`x = x.masked_fill({mask}, ...)`"

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.matches(updated, m.SimpleStatementLine([m.Assign(value=self.fill)])):
            return updated
        assign = updated.body[0]
        added = cst.BinaryOperation(assign.value.func.value, cst.Add(), cst.Name(self.mask))
        return self.mark(updated.with_changes(body=[assign.with_changes(value=added)]), "additive mask")


class BoolMaskToAdditive(Rule):
    """In `<method>`, `<m> = <expr>.bool()` becomes `<m> = <expr>.float() * <value>`: the model's own mask
    builder then makes the additive mask the patched attention adds (True, i.e. hidden, -> <value>)."""

    def __init__(self, method: str = "get_masks", value: str = "-10000.0") -> None:
        super().__init__()
        self.method, self.value = method, value
        self.to_bool = m.Assign(value=m.Call(func=m.Attribute(attr=m.Name("bool")), args=[]))
        self.name = "bool-mask-to-additive"
        self.anchor = f"`mask = (...).bool()` in {method}"
        self._depth = 0

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._depth += node.name.value == self.method

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        self._depth -= original.name.value == self.method
        return updated

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not self._depth or not m.matches(updated, m.SimpleStatementLine([self.to_bool])):
            return updated
        assign = updated.body[0]
        value = cst.parse_expression(f"{_code(assign.value.func.value)}.float() * {self.value}")
        return self.mark(updated.with_changes(body=[assign.with_changes(value=value)]), "additive mask")


class UnguardCall(Rule):
    """`if <cond>: x = self.<method>(...)` (no else) becomes `x = self.<method>(...)`: ChatGLM builds its mask
    only for padding or a multi-token step with a cache, relying on the built-in causal mask otherwise."""

    def __init__(self, method: str = "get_masks") -> None:
        super().__init__()
        self.method = method
        call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name(method)))
        self.target = m.If(body=m.IndentedBlock([m.SimpleStatementLine([m.Assign(value=call)])]), orelse=None)
        self.name = "unguard-call"
        self.anchor = f"`if ...: x = self.{method}(...)` with no else"

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement:
        if not m.matches(original, self.target):  # not an enclosing `if` this rule just emptied
            return updated
        stmt = updated.body.body[0].with_changes(leading_lines=updated.leading_lines)
        return self.mark(stmt, f"`{self.method}` always runs: the attention no longer masks by itself")


class PresentBeforeConcat(Rule):
    """Take `present = (k, v)` before `if <cache> is not None: ... torch.cat(...)` and return it where the
    function stored the concatenated pair (`<cache> = (k, v)` becomes `<cache> = present`), so a block hands
    back this step's K/V only; the host keeps the history. Works for the concat at function level and
    nested in `if use_cache:` (the first chatglm2 revision)."""

    def __init__(self, cache: str = "kv_cache") -> None:
        super().__init__()
        self.cache = cache
        self.concat = m.If(test=m.Comparison(left=m.Name(cache), comparisons=[m.ComparisonTarget(
            operator=m.IsNot(), comparator=m.Name("None"))]), body=contains(m.Attribute(
                value=m.Name("torch"), attr=m.Name("cat"))))
        self.store = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name(cache))],
                                                     value=m.Tuple([m.Element(m.Name()), m.Element(m.Name())]))])
        self.name = "present-before-concat"
        self.anchor = f"`if {cache} is not None: ... torch.cat(...)` then `{cache} = (k, v)` in one function"
        self._pair: cst.Tuple | None = None

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        stores = m.findall(node, self.store)
        self._pair = stores[0].body[0].value if stores and m.findall(node, self.concat) else None

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        if self._pair is None:
            return updated
        body = []
        for stmt in updated.body:
            if m.matches(stmt, self.concat):
                present = cst.parse_statement(f"present = {_code(self._pair)}\n")
                present = present.with_changes(leading_lines=stmt.leading_lines)
                body.append(self.mark(present, "this step's K/V, before the cache is concatenated"))
                stmt = stmt.with_changes(leading_lines=[])
            elif m.matches(stmt, self.store):
                assign = stmt.body[0].with_changes(value=cst.Name("present"))
                stmt = self.mark(stmt.with_changes(body=[assign]), "return this step's K/V", same_site=True)
            body.append(stmt)
        return updated.with_changes(body=body)
