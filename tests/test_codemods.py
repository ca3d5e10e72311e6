"""Each shared rule on a minimal snippet: what it rewrites, and that it leaves other code alone."""

from __future__ import annotations

import libcst as cst
import pytest

from surgery.codemod import Outcome, Patch, markers, run_patch
from surgery.patches.causal_mask import RegisteredCausalMask, TrilCausalMask
from surgery.patches.common import (
    ForceModuleConstant,
    KeepElseOfFlagBranch,
    OptionalImport,
    ReplaceMethodCall,
    ScalarDivision,
    prune_dead_assignments,
)


def rewrite(rule, source: str) -> str | None:
    new = rule.run(cst.parse_module(source), "test/rule")
    return None if new is None else new.code


def code_lines(source: str) -> list[str]:
    """Non-comment, non-blank lines, stripped."""
    return [s.strip() for s in source.splitlines() if s.strip() and not s.strip().startswith("#")]


def test_force_module_constant_only_at_module_level():
    src = "FLAG = compute()\ndef f():\n    FLAG = 1\n"
    out = rewrite(ForceModuleConstant("FLAG", "False"), src)
    assert code_lines(out) == ["FLAG = False", "def f():", "FLAG = 1"]
    assert "# surgery: test/rule: was `compute()`" in out
    assert rewrite(ForceModuleConstant("OTHER", "False"), src) is None


def test_scalar_division_replaces_zero_dim_full():
    src = "w = w / torch.full([], s ** 0.5, dtype=w.dtype, device=w.device)\nz = x / torch.full([2], 3)\n"
    out = rewrite(ScalarDivision(), src)
    assert code_lines(out) == ["w = w / (s ** 0.5)", "z = x / torch.full([2], 3)"]


def test_keep_else_of_flag_branch_handles_if_and_elif():
    src = ("if a and FLAG:\n    x = 1\nelse:\n    x = 2\n"
           "if b:\n    y = 1\nelif FLAG:\n    y = 2\nelse:\n    y = 3\n"
           "if FLAG:\n    z = 1\n")
    out = rewrite(KeepElseOfFlagBranch("FLAG"), src)
    assert code_lines(out) == ["x = 2", "if b:", "y = 1", "else:", "y = 3", "if FLAG:", "z = 1"]


def test_optional_import_skips_imports_already_in_try():
    src = ("def f():\n    from pkg.main import A\n"
           "try:\n    from pkg import B\nexcept ImportError:\n    B = None\n")
    out = rewrite(OptionalImport("pkg"), src)
    assert out.count("try:") == 2 and "raise ImportError" in out
    compile(out, "x", "exec")
    assert rewrite(OptionalImport("other"), src) is None


def test_replace_method_call_formats_arguments():
    src = "h = self.get_head_mask(hm, self.n)\n"
    out = rewrite(ReplaceMethodCall("get_head_mask", "([None] * {1} if {0} is None else {0})", "gone"), src)
    assert code_lines(out) == ["h = ([None] * self.n if hm is None else hm)"]


def test_registered_causal_mask_removes_mask_and_its_temporaries_only():
    src = '''
def _attn(self, q, k, registered_causal_mask, attention_mask=None):
    w = q @ k
    query_length, key_length = q.size(-2), k.size(-2)
    causal_mask = registered_causal_mask[:, :, key_length - query_length : key_length, :key_length]
    mask_value = torch.finfo(w.dtype).min
    mask_value = torch.full([], mask_value, dtype=w.dtype)
    w = torch.where(causal_mask, w, mask_value)
    if attention_mask is not None:
        w = w + attention_mask
    return w, key_length
'''
    out = rewrite(RegisteredCausalMask(), src)
    # key_length is still returned, so its assignment stays; the rest of the mask code goes
    assert code_lines(out) == [
        "def _attn(self, q, k, registered_causal_mask, attention_mask=None):", "w = q @ k",
        "query_length, key_length = q.size(-2), k.size(-2)", "if attention_mask is not None:",
        "w = w + attention_mask", "return w, key_length"]


def test_tril_causal_mask_rule():
    src = '''
def _attn(self, q, k, causal_mask=None):
    w = q @ k
    mask_value = torch.finfo(w.dtype).min
    if causal_mask is not None:
        w = torch.where(causal_mask, w, mask_value)
    return w
def forward(self, q, k):
    if q.size(1) == k.size(1):
        causal_mask = torch.tril(torch.ones((4, 4), dtype=torch.bool))
    else:
        causal_mask = None
    return self._attn(q, k, causal_mask)
'''
    out = "\n".join(code_lines(rewrite(TrilCausalMask(), src)))
    assert "torch.where" not in out and "tril" not in out and "mask_value" not in out
    assert "causal_mask = None" in out
    assert rewrite(RegisteredCausalMask(), src) is None


def test_prune_keeps_names_still_read():
    body = cst.parse_module("a = 1\nb = a\nc = 2\nuse(c)\n").body
    kept = prune_dead_assignments(body, {"a", "b", "c"})
    assert [cst.Module([]).code_for_node(s).strip() for s in kept] == ["c = 2", "use(c)"]


@pytest.mark.parametrize("required,expected", [(True, Outcome.ANCHOR_NOT_FOUND), (False, Outcome.NOT_APPLICABLE)])
def test_run_patch_outcomes(required, expected):
    module = cst.parse_module("x = 1\n")
    patch = Patch("flag", "force FLAG", [ForceModuleConstant("FLAG", "False")], required=required,
                  absent_reason="no FLAG here")
    _, result = run_patch(patch, "p", "m.py", module, markers(module))
    assert result.outcome is expected
    if required:
        assert "module-level assignment `FLAG = ...`" in result.detail
    else:
        assert result.detail == "no FLAG here"


def test_run_patch_is_idempotent_through_markers():
    module = cst.parse_module("FLAG = True\n")
    patch = Patch("flag", "force FLAG", [ForceModuleConstant("FLAG", "False")])
    once, first = run_patch(patch, "p", "m.py", module, markers(module))
    twice, second = run_patch(patch, "p", "m.py", once, markers(once))
    assert (first.outcome, second.outcome) == (Outcome.APPLIED, Outcome.ALREADY_APPLIED)
    assert twice.code == once.code


@pytest.mark.parametrize("cache", ["past_key_values", "cache"])
def test_cache_to_present_takes_either_cache_name(cache):
    """transformers 5.24 renamed the attention's `past_key_values` argument to `cache`."""
    from surgery.patches.native import CacheToPresent

    src = (f"def forward(self, h, {cache}=None):\n"
           "    k, v = self.k(h), self.v(h)\n"
           f"    if {cache} is not None:\n"
           f"        k, v = {cache}.update(k, v, self.layer_idx)\n"
           "    return attn(k, v), w\n")
    out = rewrite(CacheToPresent(), src)
    assert out == (f"def forward(self, h, {cache}=None):\n"
                   "    k, v = self.k(h), self.v(h)\n"
                   "    # surgery: test/rule: this step's K/V, BSHD\n"
                   "    present = (k.transpose(1, 2), v.transpose(1, 2))\n"
                   f"    if {cache} is not None:\n"
                   f"        k = torch.cat(({cache}[0].transpose(1, 2), k), dim=2)\n"
                   f"        v = torch.cat(({cache}[1].transpose(1, 2), v), dim=2)\n"
                   "    # surgery: test/rule: returns present\n"
                   "    return attn(k, v), present\n")
