"""Rules for the Baichuan2 remote code (a rule library: it defines no pack; `patches/baichuan.py` lists them).

That code attends through SDPA inside `torch.backends.cuda.sdp_kernel` (7B), stores the concatenated cache
as the layer's present, normalizes the head's rows in its forward (`NormHead`), and builds its rotary tables
as plain tensors in `__init__`, which transformers 5 creates on the meta device. The block contract needs
eager attention with an additive mask input, only this step's K/V, and a head that is one product with rows
folded at export. Each rule is matched with `libcst.matchers` and parameterised by the names it looks for.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule

from .common_rules import wrap_in_try


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


SDPA = m.Call(func=m.Attribute(attr=m.Name("scaled_dot_product_attention")))
SDP_KERNEL = m.With(items=[m.WithItem(item=m.Call(func=m.Attribute(attr=m.Name("sdp_kernel"))))])


class EagerSdpa(Rule):
    """`<out> = F.scaled_dot_product_attention(q, k, v, attn_mask=<mask>)` becomes matmul, `+ <mask>`, softmax,
    matmul, and a `with torch.backends.cuda.sdp_kernel(...)` around it is unwrapped: exporters lower SDPA to
    ops NPU compilers pattern-match poorly (or not at all at opset < 14), and the kernel context is CUDA-only."""

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
            return updated  # dropout, is_causal or a scale: not the eval call this rule knows
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


class FoldedNormHead(Rule):
    """`<cls>.forward`, which normalizes `self.weight` (on first use, in place) before `linear(x, w)`, becomes
    one product with `self.weight` while the TorchScript exporter traces it, and `linear(x, normalize(w))`
    otherwise. Export writes the head's table with its rows already normalized (the pack's export spec says
    so), so the graph is a plain product; eager torch, whose weights are the checkpoint's, stays exact, and
    normalizing is idempotent, so folded rows give the same logits."""

    def __init__(self, cls: str = "NormHead") -> None:
        super().__init__()
        self.cls = cls
        self.normalize = m.Call(func=m.Attribute(attr=m.Name("normalize")),
                                args=[m.Arg(m.Attribute(value=m.Name("self"), attr=m.Name("weight")))])
        self.ret = m.Return(value=m.Call(func=m.Attribute(attr=m.Name("linear")), args=[m.Arg(), m.Arg()]))
        self.name = "folded-norm-head"
        self.anchor = f"`{cls}.forward` with `normalize(self.weight)` and `return ...linear(x, w)`"

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if updated.name.value != self.cls:
            return updated
        body = []
        for stmt in updated.body.body:
            if m.matches(stmt, m.FunctionDef(name=m.Name("forward"))) and m.findall(stmt, self.normalize):
                returns = m.findall(stmt, self.ret)
                if returns:
                    stmt = self._rewrite(stmt, m.findall(stmt, self.normalize)[0], returns[-1].value)
            body.append(stmt)
        return updated.with_changes(body=updated.body.with_changes(body=body))

    def _rewrite(self, forward: cst.FunctionDef, normalize: cst.Call, linear: cst.Call) -> cst.FunctionDef:
        x = _code(linear.args[0].value)
        weight = cst.parse_statement(f"weight = self.weight if torch.jit.is_tracing() else {_code(normalize)}\n")
        ret = cst.parse_statement(f"return {_code(linear.func)}({x}, weight)\n")
        weight = self.mark(weight, "rows normalized in torch; export writes them folded into the head's table")
        return forward.with_changes(body=forward.body.with_changes(body=[weight, ret]))


class TensorsOnCpuInInit(Rule):
    """Run `<cls>.__init__` after `super().__init__()` under `with torch.device("cpu"):`. transformers 5 builds
    models on the meta device, and tensors kept as plain attributes (not parameters or buffers: Baichuan2-7B's
    rotary tables) are then never loaded: the first forward fails with "Cannot copy out of meta tensor"."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls = cls
        self.name = "tensors-on-cpu"
        self.anchor = f"`{cls}.__init__` not yet under `with torch.device(...)`"
        self.super_init = m.SimpleStatementLine([m.Expr(m.Call(func=m.Attribute(
            value=m.Call(func=m.Name("super")), attr=m.Name("__init__"))))])

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        if updated.name.value != self.cls:
            return updated
        body = []
        for stmt in updated.body.body:
            if m.matches(stmt, m.FunctionDef(name=m.Name("__init__"))) and not m.findall(stmt, m.With()):
                inner = list(stmt.body.body)
                head = 1 if inner and m.matches(inner[0], self.super_init) else 0
                if inner[head:]:
                    wrapped = cst.parse_statement('with torch.device("cpu"):\n    pass\n')
                    wrapped = wrapped.with_changes(body=wrapped.body.with_changes(body=inner[head:]))
                    inner[head:] = [self.mark(wrapped, "transformers 5 would leave these tensors on the meta device")]
                    stmt = stmt.with_changes(body=stmt.body.with_changes(body=inner))
            body.append(stmt)
        return updated.with_changes(body=updated.body.with_changes(body=body))


class UnwrapOneTuple(Rule):
    """`self.<attr> = (<x>,)` becomes `self.<attr> = <x>`. BaichuanConfig stores `gradient_checkpointing` as a
    1-tuple, always truthy; transformers 5's `post_init` reads the flag and turns checkpointing on, whose input
    hook makes every embedding output require grad, even in eval."""

    def __init__(self, attr: str) -> None:
        super().__init__()
        self.attr = attr
        self.target = m.SimpleStatementLine([m.Assign(
            targets=[m.AssignTarget(m.Attribute(value=m.Name("self"), attr=m.Name(attr)))],
            value=m.Tuple([m.Element()]))])
        self.name = "unwrap-one-tuple"
        self.anchor = f"`self.{attr} = (<x>,)`"

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.matches(updated, self.target):
            return updated
        assign = updated.body[0]
        plain = assign.with_changes(value=assign.value.elements[0].value)
        return self.mark(updated.with_changes(body=[plain]), f"`{self.attr}` a bool, not a 1-tuple (always truthy)")


class ImportOrNone(Rule):
    """Module-level `from <module> import a, b` becomes `try: <it> except ImportError: a = b = None`.
    transformers refuses remote code whose top-level imports are missing unless they sit in a try block;
    Baichuan2-13B imports accelerate's `init_empty_weights` for its 4-bit loader only, which export never runs."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module
        self.name = "import-or-none"
        self.anchor = f"a module-level `from {module} import ...`"

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        body = []
        for stmt in updated.body:
            imports = m.SimpleStatementLine([m.ImportFrom(module=m.Name(self.module), names=m.DoNotCare())])
            if m.matches(stmt, imports) and isinstance(stmt.body[0].names, (list, tuple)):
                names = " = ".join(a.evaluated_alias or a.evaluated_name for a in stmt.body[0].names)
                wrapped = wrap_in_try(stmt, f"except ImportError:\n    {names} = None\n")
                stmt = self.mark(wrapped, f"{self.module} is optional: only its 4-bit loader uses it")
            body.append(stmt)
        return updated.with_changes(body=body)
