"""Exact before/after for every rule in `patches/common_rules.py`, and the snippet where each finds no anchor."""

from __future__ import annotations

from functools import partial

import libcst.matchers as m

from surgery.codemod_testing import assert_rule
from surgery.patches.common_rules import (
    CallFirstInMethod,
    ForceModuleConstant,
    HoistBefore,
    KeepElseOfFlagBranch,
    ReplaceMethodCall,
    ScalarDivision,
)

CONSTANT = """
    import os
    FLAG = compute()


    def f():
        FLAG = 1
        return FLAG
"""


def test_force_module_constant_only_at_module_level():
    assert_rule(partial(ForceModuleConstant, "FLAG", "False"), CONSTANT, """
        import os
        # surgery: test/rule: was `compute()`
        FLAG = False


        def f():
            FLAG = 1
            return FLAG
    """)
    assert_rule(partial(ForceModuleConstant, "OTHER", "False"), CONSTANT, None)


FLAG_BRANCHES = """
    def attn(q, k):
        # choose the path
        if a and FLAG:
            x = sdpa(q, k)
        else:
            x = eager(q, k)
            x = x + 1
        if b:
            y = 1
        elif FLAG:
            y = 2
        else:
            y = 3
        if FLAG:
            z = 1
        return x, y, z
"""


def test_keep_else_of_flag_branch_handles_if_and_elif():
    """`if FLAG` without an else is left alone: there is no other path to keep."""
    after = """
        def attn(q, k):
            # choose the path
            # surgery: test/rule: `FLAG` branch removed
            x = eager(q, k)
            x = x + 1
            # surgery: test/rule: `FLAG` branch removed
            if b:
                y = 1
            else:
                y = 3
            if FLAG:
                z = 1
            return x, y, z
    """
    assert_rule(partial(KeepElseOfFlagBranch, "FLAG"), FLAG_BRANCHES, after)
    assert_rule(partial(KeepElseOfFlagBranch, "FLAG"), FLAG_BRANCHES, after)  # a fresh rule: no state carried over
    assert_rule(partial(KeepElseOfFlagBranch, "FLAG"), "if FLAG:\n    z = 1\n", None)


def test_scalar_division_replaces_zero_dim_full():
    assert_rule(ScalarDivision, """
        w = w / torch.full([], s ** 0.5, dtype=w.dtype, device=w.device)
        z = x / torch.full([2], 3)
    """, """
        # surgery: test/rule: plain scalar division
        w = w / (s ** 0.5)
        z = x / torch.full([2], 3)
    """)
    assert_rule(ScalarDivision, "z = x / torch.full([2], 3)\nw = w / s\n", None)


HOIST = partial(HoistBefore, m.If(test=m.Name("use_cache")), m.If(test=m.Name("layer_past")), name="hoist",
                anchor="`if use_cache:` after `if layer_past:`", note="this step's K/V only")
CACHE_THEN_PRESENT = """
    def attn(self, key, value, layer_past, use_cache):
        key = self.k(key)
        if layer_past:
            key = torch.cat((layer_past[0], key), dim=1)
            value = torch.cat((layer_past[1], value), dim=1)

        if use_cache:
            present = (key, value)
        else:
            present = None
        return key, present
"""


def test_hoist_before_moves_the_statement_in_front():
    assert_rule(HOIST, CACHE_THEN_PRESENT, """
        def attn(self, key, value, layer_past, use_cache):
            key = self.k(key)

            # surgery: test/rule: this step's K/V only
            if use_cache:
                present = (key, value)
            else:
                present = None
            if layer_past:
                key = torch.cat((layer_past[0], key), dim=1)
                value = torch.cat((layer_past[1], value), dim=1)
            return key, present
    """)


def test_hoist_before_needs_both_statements_in_that_order():
    assert_rule(HOIST, """
        def attn(self, key, layer_past, use_cache):
            if use_cache:
                present = key
            if layer_past:
                key = torch.cat((layer_past, key))
    """, None)
    assert_rule(HOIST, "def attn(self, key, use_cache):\n    if use_cache:\n        present = key\n", None)




HEAD_MASK = partial(ReplaceMethodCall, "get_head_mask", "([None] * {1} if {0} is None else {0})", note="gone")


def test_replace_method_call_formats_arguments():
    assert_rule(HEAD_MASK, """
        def forward(self, hm):
            h = self.get_head_mask(hm, self.n)
            return h
    """, """
        def forward(self, hm):
            # surgery: test/rule: gone
            h = ([None] * self.n if hm is None else hm)
            return h
    """)
    assert_rule(HEAD_MASK, "h = get_head_mask(hm, n)\nh = other.get_head_mask(hm, n)\n", None)


CALL_FIRST = partial(CallFirstInMethod, "Model", "_init_weights", "def _helper(module):\n    module.ready = True\n",
                     "_helper(module)", note="buffers")


def test_call_first_in_method_after_the_docstring_and_helper_at_the_end():
    assert_rule(CALL_FIRST, '''
        class Model:
            def _init_weights(self, module):
                """Initialize."""
                module.weight.zero_()

            def other(self):
                pass
    ''', '''
        class Model:
            def _init_weights(self, module):
                """Initialize."""
                # surgery: test/rule: buffers
                _helper(module)
                module.weight.zero_()

            def other(self):
                pass


        # surgery: test/rule: buffers
        def _helper(module):
            module.ready = True
    ''')


def test_call_first_in_method_needs_that_class_and_method():
    assert_rule(CALL_FIRST, """
        class Other:
            def _init_weights(self, module):
                pass


        def _init_weights(module):
            pass
    """, None)
