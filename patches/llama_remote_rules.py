"""Rules for remote code written on the transformers 4.3x Llama structure (a rule library: it defines no
pack; `patches/internlm2.py` and `patches/minicpm.py` list them).

That generation of remote code (InternLM2, MiniCPM and many fine-tunes copied `modeling_llama.py` of late
2023) asks its rotary module for a cos/sin table as long as the keys inside every attention, and hands back
the whole concatenated cache. The block contract gives each block this step's cos/sin rows and wants only
this step's K/V back. Each rule is matched with `libcst.matchers` and parameterised by the names it reads.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import IS_NOT_NONE, _ImportOutsideTry, contains, torch_call


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


PAIR = m.Tuple([m.Element(m.Name()), m.Element(m.Name())])


class RotaryFromKwargs(Rule):
    """`cos, sin = self.rotary_emb(...)` becomes `cos, sin = kwargs["<key>"]`: the caller passes the table.

    Asked for inside the attention, the rotary module sizes its table by the key length, which in a static
    decode graph is SEQ + 1 (the padded history plus this token), and a dynamic NTK module changes its base
    once that passes max_position_embeddings. Given from outside, the table is built once for SEQ positions,
    where every scaling these modules do is an identity."""

    def __init__(self, key: str = "position_embeddings") -> None:
        super().__init__()
        self.key = key
        self.call = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("rotary_emb")))
        self.pattern = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(PAIR)], value=self.call)])
        self.name = "rotary-from-kwargs"
        self.anchor = "`cos, sin = self.rotary_emb(...)` in a method taking **kwargs"
        self._kwargs: list[bool] = []  # per enclosing function: does it take **kwargs

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        star = node.params.star_kwarg
        self._kwargs.append(star is not None and star.name.value == "kwargs")

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        self._kwargs.pop()
        return updated

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not self._kwargs or not self._kwargs[-1] or not m.matches(updated, self.pattern):
            return updated
        assign = updated.body[0]
        new = assign.with_changes(value=cst.parse_expression(f'kwargs["{self.key}"]'))
        return self.mark(updated.with_changes(body=[new]), f"was `{_code(assign.value)}`: the caller's table")


class PresentBeforeCacheConcat(Rule):
    """Take `present = (k, v)` before `if <cache> is not None: ... torch.cat(...)`, and store `present`
    where the function stored the concatenated pair (`<cache> = (k, v) if use_cache else None` becomes
    `<cache> = present if use_cache else None`), so a block returns this step's K/V and the host keeps
    the history."""

    def __init__(self, cache: str = "past_key_value") -> None:
        super().__init__()
        self.concat = m.If(test=m.Comparison(left=m.Name(cache), comparisons=[IS_NOT_NONE]),
                           body=contains(torch_call("cat")))
        self.store = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name(cache))],
                                                     value=PAIR | m.IfExp(body=PAIR))])
        self.name = "present-before-cache-concat"
        self.anchor = f"`if {cache} is not None: ... torch.cat(...)` then `{cache} = (k, v) [if use_cache ...]`"

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        body = list(updated.body)
        at = next((i for i, s in enumerate(body) if m.matches(s, self.concat)), None)
        store = next((i for i, s in enumerate(body) if m.matches(s, self.store)), None)
        if at is None or store is None or store < at:
            return updated
        assign = body[store].body[0]
        pair = assign.value.body if isinstance(assign.value, cst.IfExp) else assign.value
        present = cst.parse_statement(f"present = {_code(pair)}\n").with_changes(leading_lines=body[at].leading_lines)
        value = (assign.value.with_changes(body=cst.Name("present")) if isinstance(assign.value, cst.IfExp)
                 else cst.Name("present"))
        body[store] = self.mark(body[store].with_changes(body=[assign.with_changes(value=value)]),
                                "store this step's K/V", same_site=True)
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


class EagerAttentionClass(Rule):
    """`<TABLE>[<key>](...)` -> `<eager>(...)`: the layer always builds the eager attention class, whatever
    `config._attn_implementation` transformers picked (5.x picks sdpa for a model that says it supports it)."""

    name = "eager-attention-class"

    def __init__(self, table: str, eager: str) -> None:
        super().__init__()
        self.lookup = m.Subscript(value=m.Name(table))
        self.eager = eager
        self.anchor = f"`{table}[...]`"

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.lookup):
            return updated
        new = m.replace(updated, self.lookup, cst.Name(self.eager))
        return self.mark(new, "eager attention only (no SDPA/flash class)")


class ImportWithFallback(_ImportOutsideTry):
    """`from <module> import ...` -> `try: <that import> except ImportError: <fallback>`: a helper module the
    remote code was written against and transformers 5 removed, replaced by the same functions defined here."""

    name = "import-with-fallback"

    def __init__(self, module: str, fallback: str) -> None:
        super().__init__(module)
        self.fallback = fallback
        self.anchor = f"`from {module} import ...` outside a try block"

    def imports(self, module: str) -> bool:
        return module == self.module

    def handler(self) -> tuple[str, str]:
        indented = "".join(f"    {line}\n" if line else "\n" for line in self.fallback.strip("\n").splitlines())
        return f"except ImportError:\n{indented}", f"{self.module} is gone in transformers 5"


def tuple_cache_block(block, hidden, cos, sin, mask, past):
    """A decoder layer of this code generation, patched by `RotaryFromKwargs` and a present-K/V rule: K/V
    are [B, kv_heads, S, D] and its cos/sin table is indexed by position_ids, so it gets this step's rows
    as a table of S rows indexed 0..S-1. The contract's K/V are [B, S, kv_heads, D]."""
    import torch

    positions = torch.arange(hidden.shape[1])[None]
    cache = None if past is None else (past[0].transpose(1, 2), past[1].transpose(1, 2))
    out = block(hidden, attention_mask=mask, position_ids=positions, past_key_value=cache, use_cache=True,
                position_embeddings=(cos[0], sin[0]))
    k, v = out[1]
    return out[0], k.transpose(1, 2), v.transpose(1, 2)
