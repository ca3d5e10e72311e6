"""Exact before/after for the rotary-from-caller rule (patches/rotary_rules.py), on a snippet in the shape of
Qwen-7B's first release (each attention computing its own table of angles)."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.rotary_rules import RotaryFromCaller

ROTATE = """if pos is None:
    pos = {own}
    pos = [pos.cos(), pos.sin()]
q = rotate(q, pos)
"""
PAIR = "if isinstance(freqs, list):\n    return t * freqs[0]\n"
FROM_CALLER = partial(RotaryFromCaller, "pos", "rotary_emb", "rotate", "attn", ROTATE, PAIR)


def test_rotary_from_caller_threads_the_table_and_keeps_the_own_one():
    assert_rule(FROM_CALLER, """
        class Attention:
            def forward(self, x, past=None, use_cache=False):
                n = x.size(1)
                pos = self.rotary_emb(n).to(x.device)

                if pos is not None:
                    q = rotate(q, pos)
                return q


        class Block:
            def forward(self, x, past=None):
                out = self.attn(
                    x,
                    past=past,
                )
                return out


        def rotate(t, freqs):
            return t * freqs.cos()
    """, """
        class Attention:
            def forward(self, x, past=None, use_cache=False, pos=None):
                n = x.size(1)
                # surgery: test/rule: this step's [cos, sin] from the caller, else the attention's own `pos`
                if pos is None:
                    pos = self.rotary_emb(n).to(x.device)
                    pos = [pos.cos(), pos.sin()]
                q = rotate(q, pos)
                return q


        class Block:
            def forward(self, x, past=None, pos=None):
                # surgery: test/rule: passes the caller's `pos` on
                out = self.attn(
                    x,
                    past=past,
                    pos=pos,
                )
                return out


        def rotate(t, freqs):
            # surgery: test/rule: takes the pair a patched attention passes
            if isinstance(freqs, list):
                return t * freqs[0]
            return t * freqs.cos()
    """)


def test_rotary_from_caller_needs_the_table_applied_in_that_forward():
    # the table built by the model and handed to the blocks (2023-09 and later): nothing to thread
    assert_rule(FROM_CALLER, """
        class Model:
            def forward(self, x):
                pos = self.rotary_emb(x.size(1))
                return self.h(x, pos=pos)
    """, None)
