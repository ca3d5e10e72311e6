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

from .common_rules import IS_NOT_NONE, contains, torch_call


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
