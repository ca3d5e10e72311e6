"""Exact before/after for the built-in causal mask rules of the Qwen-v1 revision styles, and for the rule that
adds the input mask where a 2023-09 `_attn` never read it."""

from __future__ import annotations

from surgery.codemod_testing import assert_rule
from surgery.patches.causal_mask_rules import AddAttentionMask, RegisteredCausalMask, TrilCausalMask

REGISTERED = """
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


    def forward(self, q, k):
        causal_mask = make()
        return torch.where(causal_mask, q, k)
"""

TRIL = """
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
"""


def test_registered_causal_mask_removes_mask_and_its_temporaries_only():
    """key_length is still returned, so its assignment stays; `forward` is not one of the methods."""
    assert_rule(RegisteredCausalMask, REGISTERED, """
        def _attn(self, q, k, registered_causal_mask, attention_mask=None):
            w = q @ k
            query_length, key_length = q.size(-2), k.size(-2)

            # surgery: test/rule: built-in causal mask removed; the attention_mask input masks
            if attention_mask is not None:
                w = w + attention_mask
            return w, key_length


        def forward(self, q, k):
            causal_mask = make()
            return torch.where(causal_mask, q, k)
    """)
    assert_rule(RegisteredCausalMask, TRIL, None)


def test_tril_causal_mask_removes_the_use_and_the_build():
    assert_rule(TrilCausalMask, TRIL, """
        def _attn(self, q, k, causal_mask=None):
            w = q @ k
            # surgery: test/rule: built-in causal mask removed; the attention_mask input masks
            return w


        def forward(self, q, k):
            # surgery: test/rule: the tril mask is no longer built
            causal_mask = None
            return self._attn(q, k, causal_mask)
    """)
    assert_rule(TrilCausalMask, REGISTERED, None)


UNREAD = """
    def _attn(self, q, k, registered_causal_mask, attention_mask=None):
        w = q @ k
        w = torch.where(registered_causal_mask, w, -1e4)
        # to probabilities
        w = nn.functional.softmax(w, dim=-1)
        return w


    def _upcast_and_reordered_attn(self, q, k, attention_mask=None):
        w = (q @ k).float()
        w = w.softmax(dim=-1)
        return w
"""


def test_add_attention_mask_before_softmax_where_attn_never_reads_it():
    """Only the named method changes; its comments stay above the new statement with the marker."""
    assert_rule(AddAttentionMask, UNREAD, """
        def _attn(self, q, k, registered_causal_mask, attention_mask=None):
            w = q @ k
            w = torch.where(registered_causal_mask, w, -1e4)
            # to probabilities
            # surgery: test/rule: the additive attention_mask input is the only mask
            if attention_mask is not None:
                w = w + attention_mask

            w = nn.functional.softmax(w, dim=-1)
            return w


        def _upcast_and_reordered_attn(self, q, k, attention_mask=None):
            w = (q @ k).float()
            w = w.softmax(dim=-1)
            return w
    """)


def test_add_attention_mask_not_where_the_mask_is_read_or_not_taken():
    assert_rule(AddAttentionMask, REGISTERED, None)  # 2023-11 already adds it
    assert_rule(AddAttentionMask, """
        def _attn(self, q, k):
            return (q @ k).softmax(dim=-1)
    """, None)
