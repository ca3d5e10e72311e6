"""Rules for InternVL's remote code (a rule library: it defines no pack; patches/internvl.py does).

InternVL's chat model builds its language model from transformers' own `Qwen2ForCausalLM` /
`LlamaForCausalLM`, imported by name, and picks flash attention in its constructor. Both are decided in the
chat model's file, so both rules rewrite a name there: the import is pointed at the pack's patched copy of the
transformers file, and the flash switch becomes a constant.
"""

from __future__ import annotations

from collections.abc import Mapping

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Rule


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


class ImportFromLocalCopy(Rule):
    """`from <module> import A, Qwen2ForCausalLM` -> `from <module> import A` followed by
    `from .modeling_qwen2 import Qwen2ForCausalLM`: the class now comes from the patched copy the pack writes
    beside the remote code (`copies`: imported name -> local module). Imports inside try blocks are left alone."""

    name = "import-from-local-copy"

    def __init__(self, module: str, copies: Mapping[str, str]) -> None:
        super().__init__()
        self.module, self.copies = module, dict(copies)
        self.anchor = f"`from {module} import ...` naming one of {', '.join(self.copies)}"

    def _takes(self, node: cst.BaseSmallStatement) -> bool:
        return (isinstance(node, cst.ImportFrom) and not node.relative and node.module is not None
                and _code(node.module) == self.module and not isinstance(node.names, cst.ImportStar)
                and any(a.evaluated_name in self.copies for a in node.names))

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.BaseStatement:
        if len(updated.body) != 1 or not self._takes(updated.body[0]):
            return updated
        node = updated.body[0]
        moved = [a for a in node.names if a.evaluated_name in self.copies]
        kept = [a for a in node.names if a.evaluated_name not in self.copies]
        local = [cst.parse_statement(f"from .{self.copies[a.evaluated_name]} import "
                                     f"{_code(a.with_changes(comma=cst.MaybeSentinel.DEFAULT))}\n") for a in moved]
        names = ", ".join(a.evaluated_name for a in moved)
        first = local[0].with_changes(leading_lines=[] if kept else updated.leading_lines)
        first = self.mark(first, f"{names} from the pack's patched copy, not transformers")
        if not kept:
            return cst.FlattenSentinel([first, *local[1:]])
        kept[-1] = kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        stripped = updated.with_changes(body=[node.with_changes(names=kept)])
        return cst.FlattenSentinel([stripped, first, *local[1:]])


class ForceLocalAssignment(Rule):
    """In `<cls>.<method>`, each statement `<name> = <expr>` becomes `<name> = <value>` (InternVL's
    `use_flash_attn = use_flash_attn if has_flash_attn else False` -> `use_flash_attn = False`): the flag
    is decided once, where the constructor decides it, whatever the caller or the installed packages say."""

    name = "force-local-assignment"

    def __init__(self, cls: str, method: str, target: str, value: str) -> None:
        super().__init__()
        self.cls, self.method, self.target, self.value = cls, method, target, value
        self.anchor = f"`{target} = ...` in `{cls}.{method}`"
        self._inside: list[bool] = []

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._inside.append(node.name.value == self.cls)

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        self._inside.pop()
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if not (self._inside and self._inside[-1] and updated.name.value == self.method):
            return updated
        pattern = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name(self.target))])])
        body = []
        for stmt in updated.body.body:
            if m.matches(stmt, pattern) and _code(stmt.body[0].value) != self.value:
                assign = stmt.body[0]
                stmt = self.mark(stmt.with_changes(body=[assign.with_changes(value=cst.parse_expression(self.value))]),
                                 f"was `{_code(assign.value)}`")
            body.append(stmt)
        return updated.with_changes(body=updated.body.with_changes(body=body))


class TextModelFromCopy(Rule):
    """`self.language_model = AutoModel.from_config(config.text_config)` (transformers' native InternVL) becomes
    `self.language_model = _surgery_text_model(config.text_config)`, a function added after the imports that
    builds the decoder from the pack's patched copy of its family's file (`copies`: model_type -> (module,
    class)); an unknown model_type fails at load, naming the ones the pack copied."""

    name = "text-model-from-copy"
    anchor = "`self.language_model = AutoModel.from_config(config.text_config)`"
    CALL = m.Call(func=m.Attribute(value=m.Name("AutoModel"), attr=m.Name("from_config")),
                  args=[m.Arg(m.Attribute(attr=m.Name("text_config")))])

    def __init__(self, copies: Mapping[str, tuple[str, str]]) -> None:
        super().__init__()
        self.copies = dict(copies)
        self._found = False  # the call was rewritten: the helper it calls goes after the imports

    def _helper(self) -> cst.BaseStatement:
        branches = "".join(f"    if config.model_type == {kind!r}:\n        from .{module} import {cls}\n\n"
                           f"        return {cls}(config)\n" for kind, (module, cls) in self.copies.items())
        return cst.parse_statement(f"def _surgery_text_model(config):\n{branches}    raise ValueError("
                                   f"f\"no patched copy for a {{config.model_type}} language model; the pack "
                                   f"copied {', '.join(self.copies)}\")\n")

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        pattern = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Attribute(
            value=m.Name("self"), attr=m.Name("language_model")))], value=self.CALL)])
        if not m.matches(updated, pattern):
            return updated
        call = cst.parse_expression("_surgery_text_model(config.text_config)")
        self._found = True
        return self.mark(updated.with_changes(body=[updated.body[0].with_changes(value=call)]),
                         "the decoder from the pack's patched copy, not the AutoModel registry")

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        if not self._found:
            return updated
        body = list(updated.body)
        at = max((i + 1 for i, s in enumerate(body) if m.matches(s, m.SimpleStatementLine(
            [m.ImportFrom() | m.Import()]))), default=0)
        helper = self._helper().with_changes(leading_lines=[cst.EmptyLine(), cst.EmptyLine()])
        return updated.with_changes(body=[*body[:at], self.mark(helper, "builds the copied decoder",
                                                                same_site=True), *body[at:]])
