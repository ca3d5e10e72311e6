"""Rules that put remote code on its eager attention path (a rule library: it defines no pack).

NPU compilers pattern-match matmul, add, softmax, matmul; exporters lower torch 2's fused SDPA to ops they
match poorly (or not at all at opset < 14), and transformers 5 picks an SDPA or flash class for a model that
says it supports one. These rules keep the eager path, with the additive mask input added to the scores.
A path chosen by a module flag (`SUPPORT_TORCH2`, `xops`, `pytorch_major_version`) is
`common_rules.KeepElseOfFlagBranch`.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


SDPA = m.Call(func=m.Attribute(attr=m.Name("scaled_dot_product_attention")))
SDP_KERNEL = m.With(items=[m.WithItem(item=m.Call(func=m.Attribute(attr=m.Name("sdp_kernel"))))])


class EagerSdpa(Rule):
    """`<out> = F.scaled_dot_product_attention(q, k, v, attn_mask=<mask>)` becomes matmul, `+ <mask>`, softmax,
    matmul, and a `with torch.backends.cuda.sdp_kernel(...)` around it is unwrapped (the context is CUDA-only).
    Only the eval call (no dropout, `is_causal` or scale) is this rule's anchor: the others mean more."""

    name = "eager-sdpa"
    anchor = "`x = <...>.scaled_dot_product_attention(q, k, v, attn_mask=m)`"
    ASSIGN = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name())], value=SDPA)])

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.BaseStatement | cst.FlattenSentinel:
        if not m.matches(updated, self.ASSIGN):
            return updated
        assign = updated.body[0]
        out = assign.targets[0].target.value
        positional = [_code(a.value) for a in assign.value.args if a.keyword is None]
        keywords = {a.keyword.value: _code(a.value) for a in assign.value.args if a.keyword is not None}
        if len(positional) < 3 or set(keywords) - {"attn_mask"}:
            return updated
        q, k, v = positional[:3]
        mask = positional[3] if len(positional) > 3 else keywords.get("attn_mask")
        lines = [f"{out} = torch.matmul({q}, {k}.transpose(-2, -1)) / math.sqrt({q}.size(-1))\n"]
        if mask is not None:
            lines.append(f"if {mask} is not None:\n    {out} = {out} + {mask}\n")
        lines.append(f"{out} = torch.matmul(torch.softmax({out}, dim=-1), {v})\n")
        stmts = [cst.parse_statement(line) for line in lines]
        stmts[0] = self.mark(stmts[0].with_changes(leading_lines=updated.leading_lines),
                             "eager attention: scores + additive mask, softmax, values")
        return cst.FlattenSentinel(stmts)

    def leave_With(self, original: cst.With, updated: cst.With) -> cst.BaseStatement | cst.FlattenSentinel:
        if not m.matches(updated, SDP_KERNEL) or not m.findall(original, SDPA):
            return updated
        body = list(updated.body.body)
        body[0] = body[0].with_changes(leading_lines=[*updated.leading_lines, *body[0].leading_lines])
        return cst.FlattenSentinel(body)


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
