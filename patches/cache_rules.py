"""Rules that make a block hand back only this step's K/V (a rule library: it defines no pack).

Remote code returns the whole concatenated cache (a tuple it built with `torch.cat`, or a transformers 4.36
Cache object it updated). The block contract keeps the history on the host: a block gets the padded history
as two tensors and returns only the K/V it computed for this step. ChatGLM2/3, InternLM2, Baichuan2 and
MiniCPM list these rules with their own cache names.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import IS_NOT_NONE, contains, torch_call


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


PAIR = m.Tuple([m.Element(m.Name()), m.Element(m.Name())])


class PresentBeforeCacheConcat(Rule):
    """Take `present = (k, v)` before `if <cache> is not None: ... torch.cat(...)`, and store `present` where
    the function stores the concatenated pair after it (`<cache> = (k, v) [if use_cache else None]` becomes
    `<cache> = present [if use_cache else None]`), so a block returns this step's K/V and the host keeps the
    history. The store may be a later statement of the concat's block or nested in one (`if use_cache:
    <cache> = (k, v)`, as ChatGLM2/3 write it); `store_note` is the marker's note on it."""

    def __init__(self, cache: str = "past_key_value", store_note: str = "store this step's K/V") -> None:
        super().__init__()
        self.store_note = store_note
        self.concat = m.If(test=m.Comparison(left=m.Name(cache), comparisons=[IS_NOT_NONE]),
                           body=contains(torch_call("cat")))
        self.store = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name(cache))],
                                                     value=PAIR | m.IfExp(body=PAIR))])
        self.name = "present-before-cache-concat"
        self.anchor = f"`if {cache} is not None: ... torch.cat(...)` then `{cache} = (k, v) [if use_cache ...]`"

    def _present(self, stmt: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        assign = stmt.body[0]
        value = (assign.value.with_changes(body=cst.Name("present")) if isinstance(assign.value, cst.IfExp)
                 else cst.Name("present"))
        return self.mark(stmt.with_changes(body=[assign.with_changes(value=value)]), self.store_note, same_site=True)

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.concat)), None)
        if at is None:
            return updated
        store = next((i for i, s in enumerate(body) if i > at and m.findall(s, self.store)), None)
        if store is None:
            return updated
        found = m.findall(body[store], self.store)[0].body[0].value
        pair = found.body if isinstance(found, cst.IfExp) else found
        present = cst.parse_statement(f"present = {_code(pair)}\n").with_changes(leading_lines=body[at].leading_lines)
        body[store] = (self._present(body[store]) if m.matches(body[store], self.store)
                       else m.replace(body[store], self.store, lambda stmt, _: self._present(stmt)))
        body[at] = body[at].with_changes(leading_lines=[])
        body.insert(at, self.mark(present, "this step's K/V, before the cache is concatenated"))
        return updated.with_changes(body=body)


class CacheObjectToTuple(Rule):
    """The transformers 4.36 Cache-object update in an attention `forward` becomes a concat with history K/V
    given as a `(k, v)` tuple in [B, heads, S, D], with this step's K/V kept as `present` and returned where
    the cache object was: `<cache>.get_usable_length(...)` -> `<cache>[0].shape[-2]`, `if <cache> is not
    None: k, v = <cache>.update(k, v, ...)` -> `present = (k, v)` + `torch.cat`, `return ..., <cache>` ->
    `return ..., present`. A Cache object cannot cross a graph boundary; two tensors can."""

    name = "cache-object-to-tuple"
    TEMPLATE = ("present = ({k}, {v})\n"
                "if {cache} is not None:\n"
                "    {k} = torch.cat([{cache}[0], {k}], dim=2)\n"
                "    {v} = torch.cat([{cache}[1], {v}], dim=2)\n")

    def __init__(self, cache: str = "past_key_value") -> None:
        super().__init__()
        self.cache = cache
        update = m.Call(func=m.Attribute(value=m.Name(cache), attr=m.Name("update")))
        self.update = m.Assign(targets=[m.AssignTarget(PAIR)], value=update)
        self.branch = m.If(test=m.Comparison(left=m.Name(cache), comparisons=[IS_NOT_NONE]),
                           body=contains(self.update))
        self.usable = m.Call(func=m.Attribute(value=m.Name(cache), attr=m.Name("get_usable_length")))
        self.ret = m.SimpleStatementLine([m.Return(value=m.Tuple([m.ZeroOrMore(), m.Element(m.Name(cache))]))])
        self.anchor = f"`if {cache} is not None: k, v = {cache}.update(...)` and `return ..., {cache}` in a forward"

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        body = list(updated.body.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.branch)), None)
        if updated.name.value != "forward" or at is None or not m.matches(body[-1], self.ret):
            return updated
        k, v = (_code(e.value) for e in m.findall(body[at], self.update)[0].targets[0].target.elements)
        new = list(cst.parse_module(self.TEMPLATE.format(k=k, v=v, cache=self.cache)).body)
        new[0] = self.mark(new[0].with_changes(leading_lines=body[at].leading_lines), "this step's K/V; "
                           "history is a (k, v) tuple")
        ret = body[-1].body[0]
        body[-1] = self.mark(body[-1].with_changes(body=[ret.with_changes(value=ret.value.with_changes(
            elements=[*ret.value.elements[:-1], ret.value.elements[-1].with_changes(value=cst.Name("present"))]))]),
            "returns this step's K/V", same_site=True)
        head = [self.mark(s, "history length from the tuple", same_site=True) if m.findall(s, self.usable) else s
                for s in body[:at]]
        history = cst.parse_expression(f"{self.cache}[0].shape[-2]")
        head = [m.replace(s, self.usable, history) if m.findall(s, self.usable) else s for s in head]
        return updated.with_changes(body=updated.body.with_changes(body=head + new + body[at + 1:]))
