"""Exact before/after for the rule of transformers-4.3x Llama-structured remote code
(patches/llama_remote_rules.py: InternLM2, MiniCPM), on snippets in the upstream shapes."""

from __future__ import annotations

from surgery.codemod_testing import assert_rule
from surgery.patches.llama_remote_rules import RotaryFromKwargs


def test_rotary_from_kwargs():
    assert_rule(RotaryFromKwargs, """
        class Attention:
            def forward(self, hidden_states, position_ids=None, past_key_value=None, **kwargs):
                kv_seq_len = key_states.shape[-2]
                cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
                return apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    """, """
        class Attention:
            def forward(self, hidden_states, position_ids=None, past_key_value=None, **kwargs):
                kv_seq_len = key_states.shape[-2]
                # surgery: test/rule: was `self.rotary_emb(value_states, seq_len=kv_seq_len)`: the caller's table
                cos, sin = kwargs["position_embeddings"]
                return apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    """)


def test_rotary_from_kwargs_needs_kwargs():
    # without **kwargs the caller has no way to pass the table: not this rule's anchor
    assert_rule(RotaryFromKwargs, """
        def forward(self, x, seq_len):
            cos, sin = self.rotary_emb(x, seq_len=seq_len)
    """, None)
    assert_rule(RotaryFromKwargs, "def forward(self, x, **kwargs):\n    cos, sin = rope(x)\n", None)
















