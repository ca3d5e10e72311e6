"""Exact before/after for the two built-in causal mask rules (one per Qwen-v1 revision style)."""

from __future__ import annotations

from surgery.codemod_testing import assert_rule
from surgery.patches.causal_mask_rules import RegisteredCausalMask, TrilCausalMask

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
