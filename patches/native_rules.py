"""Codemods for modeling files that live inside transformers (llama-like families), and the factory that
turns them into a pack (a rule library: it defines no pack; `llama.py` and friends call `native_pack`).

A native pack copies the installed `transformers/models/<family>/modeling_<family>.py` into the output
directory, makes its imports absolute, rewrites it so every decoder layer takes history K/V as inputs and
returns this step's K/V ([1, S, kv_heads, head_dim]), and registers it through `auto_map`, so the patched
directory loads with `trust_remote_code=True` and nothing in site-packages is touched.
"""

from __future__ import annotations

from functools import partial

import libcst as cst
import libcst.matchers as m

from surgery.codemod import Patch, Rule
from surgery.export.arch import ArchSpec, native_block, native_rope
from surgery.export.engine_spec import NATIVE_ENGINE
from surgery.packs import ApplyOptions, Pack

from .common_rules import IS_NOT_NONE, contains

SELF_ATTN_CALL = m.Call(func=m.Attribute(value=m.Name("self"), attr=m.Name("self_attn")))
# transformers <= 5.23 names the cache argument `past_key_values` (4.x attention: `past_key_value`); 5.24
# renamed it `cache` (the old name still accepted through a deprecation decorator)
CACHE_NAMES = ("past_key_values", "past_key_value", "cache")
CACHE_NAME = m.Name(value=m.MatchIfTrue(lambda n: n in CACHE_NAMES))
CACHE_UPDATE = m.Call(func=m.Attribute(value=CACHE_NAME, attr=m.Name("update")))
LAYER_CALL = m.Call(func=m.Name("decoder_layer"))


def _code(node: cst.CSTNode) -> str:
    return cst.Module([]).code_for_node(node)


class AbsoluteImports(Rule):
    """`from ...utils import x` -> `from transformers.utils import x`, resolved against `package`."""

    name = "absolute-imports"
    anchor = "relative `from .x import y` statements"

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        body, changed = [], False
        for small in updated.body:
            if isinstance(small, cst.ImportFrom) and small.relative:
                parts = self.package.split(".")
                base = parts[: len(parts) - (len(small.relative) - 1)]
                target = ".".join(base + ([_code(small.module)] if small.module else []))
                small = small.with_changes(relative=[], module=cst.parse_expression(target))
                changed = True
            body.append(small)
        new = updated.with_changes(body=body)
        return self.mark(new, "absolute import") if changed else new


class EagerAttention(Rule):
    """`ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)` -> `eager_attention_forward`."""

    name = "get_interface (transformers 5)"
    anchor = "`ALL_ATTENTION_FUNCTIONS.get_interface(..., <eager fn>)`"
    LOOKUP = m.Call(func=m.Attribute(value=m.Name("ALL_ATTENTION_FUNCTIONS"), attr=m.Name("get_interface")))

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.LOOKUP):
            return updated
        new = m.replace(updated, self.LOOKUP, lambda node, _: node.args[-1].value)
        return self.mark(new, "eager attention only (no SDPA/flash dispatch)")


class EagerAttentionIf(Rule):
    """transformers 4.4x-4.5x: `if self.config._attn_implementation != "eager": attention_interface = ...` is
    removed; the statement after it carries the marker (a `pass` when the branch ended its block)."""

    name = "attn_implementation branch (transformers 4.x)"
    anchor = "`if self.config._attn_implementation != \"eager\": ...`"
    BRANCH = m.If(test=contains(m.Name("_attn_implementation")), body=contains(m.Name("ALL_ATTENTION_FUNCTIONS")))
    NOTE = "eager attention only (the _attn_implementation branch was removed)"

    def leave_IndentedBlock(self, original: cst.IndentedBlock, updated: cst.IndentedBlock) -> cst.IndentedBlock:
        if not any(m.matches(s, self.BRANCH) for s in updated.body):
            return updated
        body: list[cst.BaseStatement] = []
        removed = False
        for stmt in updated.body:
            if m.matches(stmt, self.BRANCH):
                removed = True
                continue
            body.append(self.mark(stmt, self.NOTE) if removed else stmt)
            removed = False
        if removed:
            body.append(self.mark(cst.SimpleStatementLine([cst.Pass()]), self.NOTE))
        return updated.with_changes(body=body)


class MaskAsGiven(Rule):
    """Calls that build a mask (`create_causal_mask(...)`, `create_sliding_window_causal_mask(...)`,
    `mask_function(...)`) -> the `attention_mask` argument itself: the caller passes the final mask."""

    name = "mask builders"
    anchor = "a call `create_*mask(...)` or `mask_function(...)`"
    BUILDER = m.Call(func=m.Name(value=m.MatchIfTrue(
        lambda n: n == "mask_function" or (n.startswith("create_") and n.endswith("mask")))))

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if not m.findall(updated, self.BUILDER):
            return updated
        new = m.replace(updated, self.BUILDER, lambda node, _: cst.Name("attention_mask"))
        return self.mark(new, "the attention_mask input is used as given")


class CacheToPresent(Rule):
    """In an attention `forward`: `if past_key_values is not None: k, v = past_key_values.update(...)`
    becomes this step's K/V in BSHD (`present`) plus a concat with history K/V given as a (k, v) pair in
    BSHD; the method returns `present` where it returned attention weights."""

    name = "cache-update"
    anchor = "`if past_key_values is not None: k, v = past_key_values.update(...)` (or `cache`) in a forward"
    TEMPLATE = (
        "present = ({k}.transpose(1, 2), {v}.transpose(1, 2))\n"
        "if {cache} is not None:\n"
        "    {k} = torch.cat(({cache}[0].transpose(1, 2), {k}), dim=2)\n"
        "    {v} = torch.cat(({cache}[1].transpose(1, 2), {v}), dim=2)\n"
    )

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        body = list(updated.body.body)
        pattern = m.If(test=m.Comparison(left=CACHE_NAME, comparisons=[IS_NOT_NONE]),
                       body=contains(CACHE_UPDATE))
        at = next((i for i, s in enumerate(body) if m.matches(s, pattern)), None)
        if updated.name.value != "forward" or at is None or not isinstance(body[-1], cst.SimpleStatementLine) \
                or not m.matches(body[-1].body[0], m.Return(value=m.Tuple([m.Element(), m.Element()]))):
            return updated
        assign = m.findall(body[at], m.Assign(value=CACHE_UPDATE))[0]
        k, v = (_code(e.value) for e in assign.targets[0].target.elements)
        cache = body[at].test.left.value
        new = list(cst.parse_module(self.TEMPLATE.format(k=k, v=v, cache=cache)).body)
        new[0] = self.mark(new[0].with_changes(leading_lines=body[at].leading_lines), "this step's K/V, BSHD")
        ret = body[-1].body[0]
        out = ret.value.elements[0].value
        body[-1] = self.mark(body[-1].with_changes(body=[ret.with_changes(value=cst.Tuple(
            [cst.Element(out), cst.Element(cst.Name("present"))], lpar=[], rpar=[]))]), "returns present",
            same_site=True)  # one site: the cache update and its return
        return updated.with_changes(body=updated.body.with_changes(body=body[:at] + new + body[at + 1:]))


class LayerReturnsPresent(Rule):
    """In a decoder layer `forward`: `hidden_states, _ = self.self_attn(...)` keeps `present`, and the
    final `return hidden_states` becomes `return hidden_states, present`."""

    name = "layer-return"
    anchor = "`hidden_states, <x> = self.self_attn(...)` ... `return hidden_states` in a forward"

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        body = list(updated.body.body)
        call = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Tuple([m.Element(), m.Element()]))],
                                               value=SELF_ATTN_CALL)])
        at = next((i for i, s in enumerate(body) if m.matches(s, call)), None)
        ret = m.SimpleStatementLine([m.Return(value=m.Name())])
        if updated.name.value != "forward" or at is None or not m.matches(body[-1], ret):
            return updated
        assign = body[at].body[0]
        first = assign.targets[0].target.elements[0]
        target = cst.Tuple([first, cst.Element(cst.Name("present"))], lpar=[], rpar=[])
        body[at] = self.mark(body[at].with_changes(body=[assign.with_changes(
            targets=[assign.targets[0].with_changes(target=target)])]), "keep this step's K/V")
        value = body[-1].body[0].value
        body[-1] = body[-1].with_changes(body=[cst.Return(cst.Tuple(
            [cst.Element(value), cst.Element(cst.Name("present"))], lpar=[], rpar=[]))])
        return updated.with_changes(body=updated.body.with_changes(body=body))


class ModelUnpacksLayer(Rule):
    """In the model `forward`: `hidden_states = decoder_layer(..., past_key_values=...)` ->
    `hidden_states, _ = decoder_layer(..., past_key_values=None)`: the patched model runs without caches."""

    name = "layer-call"
    anchor = "`hidden_states = decoder_layer(...)`"

    def leave_SimpleStatementLine(self, original: cst.SimpleStatementLine,
                                  updated: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        pattern = m.SimpleStatementLine([m.Assign(targets=[m.AssignTarget(m.Name())], value=LAYER_CALL)])
        if not m.matches(updated, pattern):
            return updated
        assign = updated.body[0]
        args = [a.with_changes(value=cst.Name("None")) if a.keyword and a.keyword.value in CACHE_NAMES else a
                for a in assign.value.args]
        target = cst.Tuple([cst.Element(assign.targets[0].target), cst.Element(cst.Name("_"))], lpar=[], rpar=[])
        new = assign.with_changes(targets=[assign.targets[0].with_changes(target=target)],
                                  value=assign.value.with_changes(args=args))
        return self.mark(updated.with_changes(body=[new]), "layers return (hidden, present); no cache object")


# transformers' own decoders all keep their pieces in the same places (see `surgery.export.arch`)
NATIVE_SPEC = ArchSpec(
    embedding="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rope_tables=native_rope,
    call_block=native_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    engine=NATIVE_ENGINE,
)


def native_patches(family: str) -> list[Patch]:
    package = f"transformers.models.{family}"
    return [
        Patch("absolute-imports", "make the copied file's relative imports absolute",
              [partial(AbsoluteImports, package)]),
        Patch("eager-attention", "always the eager attention function (no SDPA/flash dispatch)",
              [EagerAttention, EagerAttentionIf]),
        Patch("mask-as-given", "use the attention_mask input as given: no mask building",
              [MaskAsGiven]),
        Patch("cache-to-present", "attention takes history K/V (BSHD) and returns this step's K/V",
              [CacheToPresent]),
        Patch("layer-returns-present", "decoder layers return (hidden_states, present)",
              [LayerReturnsPresent]),
        Patch("model-unpacks-layer", "the model forward unpacks layer outputs and passes no cache",
              [ModelUnpacksLayer]),
    ]


def native_pack(name: str, family: str, model_types: tuple[str, ...], architecture: str, summary: str,
                checked_with: str = ">=5.20,<6", export_spec: ArchSpec = NATIVE_SPEC) -> Pack:
    """A pack for a family whose modeling code ships inside transformers (exported with NATIVE_SPEC
    unless the family keeps its pieces elsewhere)."""
    filename = f"modeling_{family}.py"

    def config_edits(opts: ApplyOptions) -> dict[str, object]:
        edits: dict[str, object] = {"auto_map": {"AutoModelForCausalLM": f"modeling_{family}.{architecture}"},
                                    "use_cache": False}
        if opts.dtype:
            edits["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[opts.dtype]
        return edits

    return Pack(name=name, version="1.0.0", summary=summary, model_types=model_types, architectures=(architecture,),
                files={filename: native_patches(family)}, config_edits=config_edits, checked_with=checked_with,
                sources={filename: f"models/{family}/{filename}"}, export_spec=export_spec)
