"""What remote code written for transformers 4.3x needs to load on transformers 5, imports aside (those are
`import_rules`); a rule library: it defines no pack.

transformers 5 dropped the generation fields from PretrainedConfig, finishes a model only in `post_init`,
builds models on the meta device (tensors kept as plain attributes are never loaded), and reads config flags
2023 code stored oddly. None of these changes what the model computes; packs list them as load-only.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule


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


class TensorsOnCpuInInit(Rule):
    """Run `<cls>.__init__` after `super().__init__()` under `with torch.device("cpu"):`. transformers 5 builds
    models on the meta device, and tensors kept as plain attributes (not parameters or buffers, e.g. rotary
    tables) are then never loaded: the first forward fails with "Cannot copy out of meta tensor"."""

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
    """`self.<attr> = (<x>,)` becomes `self.<attr> = <x>`: a flag stored as a 1-tuple is always truthy. (Baichuan2's
    config stores `gradient_checkpointing` so; transformers 5's `post_init` then turns checkpointing on, whose
    input hook makes every embedding output require grad, even in eval.)"""

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
