"""Rules for remote code written on the transformers 4.3x Llama structure (a rule library: it defines no
pack; `patches/internlm2.py` and `patches/minicpm.py` list them), and the block call that code's layers take.

That generation of remote code (InternLM2, MiniCPM and many fine-tunes copied `modeling_llama.py` of late
2023) asks its rotary module for a cos/sin table as long as the keys inside every attention; the block
contract gives each block this step's cos/sin rows. The K/V those layers return is made this step's only
by `cache_rules`, which ChatGLM and Baichuan2 share.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule


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
