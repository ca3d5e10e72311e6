"""Rules that leave the additive `attention_mask` input as a block's only mask (a rule library: it defines
no pack): remove a causal mask the model builds itself, and turn boolean masking into an added mask.

Static-shape NPU graphs take the mask as an input (prefill: causal over the padded length; decode: the
valid history slots), added to the scores: a plain Add, where a boolean `masked_fill` needs Where and a
bool input. A mask the model builds itself is at best dead weight (Where/ConstantOfShape/Equal ops in
every block) and at worst wrong for the padded static layout. Qwen-v1 and ChatGLM2/3 list these rules.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import IS_NOT_NONE, contains, prune_dead_assignments, torch_call

MASK_TEMPORARIES = ("causal_mask", "mask_value", "query_length", "key_length")


def _where_on(mask: str) -> m.Call:
    return torch_call("where", args=[m.Arg(m.Name(mask)), m.ZeroOrMore()])


class _MaskRemovalInMethods(Rule):
    """Removes, in the named methods, the statement matching `target` and the temporaries it read."""

    target: m.BaseMatcherNode

    def __init__(self, methods: tuple[str, ...]) -> None:
        super().__init__()
        self.methods = methods

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if updated.name.value not in self.methods:
            return updated
        body = list(updated.body.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.target)), None)
        if at is None:
            return updated
        del body[at]
        following = body[min(at, len(body) - 1)]
        body = [self.mark(s, "built-in causal mask removed; the attention_mask input masks")
                if s is following else s for s in prune_dead_assignments(body, MASK_TEMPORARIES)]
        return updated.with_changes(body=updated.body.with_changes(body=body))


class RegisteredCausalMask(_MaskRemovalInMethods):
    """2023-09 and 2023-11 style: `attn_weights = torch.where(causal_mask, attn_weights, mask_value)` after
    slicing `registered_causal_mask` and building `finfo.min`. The 2023-08 style slices the attention's own
    `self.bias` buffer into the same `causal_mask`, so this rule takes it too (its name is kept for reports)."""

    name = "registered_causal_mask (2023-09, 2023-11)"
    anchor = "`attn_weights = torch.where(causal_mask, ...)` in {methods}"
    target = m.SimpleStatementLine([m.Assign(value=_where_on("causal_mask"))])

    def __init__(self, methods: tuple[str, ...] = ("_attn", "_upcast_and_reordered_attn")) -> None:
        super().__init__(methods)
        self.anchor = self.anchor.format(methods=", ".join(methods))


class TrilCausalMask(_MaskRemovalInMethods):
    """2023-12 style: `forward` builds `causal_mask = torch.tril(torch.ones(...))` when query and key
    lengths match, and `_attn` applies it with `if causal_mask is not None: torch.where(...)`."""

    name = "tril causal mask (2023-12)"
    anchor = "`if ...: causal_mask = torch.tril(torch.ones(...)) ...` in forward"
    target = m.If(test=m.Comparison(left=m.Name("causal_mask"), comparisons=[IS_NOT_NONE]),
                  body=contains(_where_on("causal_mask")))
    BUILD = m.If(body=contains(m.Assign(targets=[m.AssignTarget(m.Name("causal_mask"))],
                                        value=contains(torch_call("tril")))))

    def __init__(self, methods: tuple[str, ...] = ("_attn",)) -> None:
        super().__init__(methods)

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement:
        if not m.matches(updated, self.BUILD):
            return updated
        return self.mark(cst.parse_statement("causal_mask = None\n").with_changes(
            leading_lines=updated.leading_lines), "the tril mask is no longer built")


class AddAttentionMask(Rule):
    """2023-08 and 2023-09 styles: `_attn` takes `attention_mask` but never reads it (the causal mask buffer
    was the only mask there). With that mask removed the input mask has to apply, so add it to the scores before
    the softmax: `if attention_mask is not None: <scores> = <scores> + attention_mask`."""

    name = "add attention_mask before softmax (2023-09)"
    anchor = "`<scores> = ...softmax(...)` in {methods}, which take `attention_mask` and never read it"
    SOFTMAX = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name())],
                                              value=m.Call(func=m.Attribute(attr=m.Name("softmax"))))])

    def __init__(self, methods: tuple[str, ...] = ("_attn",)) -> None:
        super().__init__()
        self.methods = methods
        self.anchor = self.anchor.format(methods=", ".join(methods))

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if updated.name.value not in self.methods:
            return updated
        takes_mask = any(p.name.value == "attention_mask" for p in updated.params.params)
        if not takes_mask or m.findall(updated.body, m.Name("attention_mask")):
            return updated
        body = list(updated.body.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.SOFTMAX)), None)
        if at is None:
            return updated
        scores = body[at].body[0].targets[0].target.value
        add = cst.parse_statement(f"if attention_mask is not None:\n    {scores} = {scores} + attention_mask\n")
        add = self.mark(add.with_changes(leading_lines=body[at].leading_lines),
                        "the additive attention_mask input is the only mask")
        body[at:at + 1] = [add, body[at].with_changes(leading_lines=[cst.EmptyLine(indent=False)])]
        return updated.with_changes(body=updated.body.with_changes(body=body))


def _is_none(name: str) -> m.Comparison:
    return m.Comparison(left=m.Name(name), comparisons=[m.ComparisonTarget(operator=m.Is(), comparator=m.Name("None"))])


class DropMaskBuilder(Rule):
    """Remove `if <mask> is None ...: <mask> = ...; <mask>.tril_() ...`: a causal mask the attention builds
    when it is given none. A fresh mask per call is [SEQ, SEQ] of ops in every block."""

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
    """`x = x.masked_fill(<mask>, ...)` becomes `x = x + <mask>`: the mask input is additive (0 or -10000)."""

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

    def __init__(self, method: str, value: str) -> None:
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
        value = cst.parse_expression(f"{cst.Module([]).code_for_node(assign.value.func.value)}.float() * {self.value}")
        return self.mark(updated.with_changes(body=[assign.with_changes(value=value)]), "additive mask")


class UnguardCall(Rule):
    """`if <cond>: x = self.<method>(...)` (no else) becomes `x = self.<method>(...)`: a mask builder the model
    runs only when it cannot rely on the built-in causal mask (ChatGLM: padding, or several tokens on a cache)
    must always run once that mask is gone."""

    def __init__(self, method: str) -> None:
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
