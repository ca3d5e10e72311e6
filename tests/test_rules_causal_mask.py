"""Exact before/after for the mask rules (patches/causal_mask_rules.py): the built-in causal masks of the Qwen-v1
revision styles, the rule that adds the input mask where a 2023-09 `_attn` never read it, and ChatGLM2/3's
boolean masks made additive."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.causal_mask_rules import (
    AddAttentionMask,
    AdditiveMask,
    BoolMaskToAdditive,
    DropMaskBuilder,
    RegisteredCausalMask,
    TrilCausalMask,
    UnguardCall,
)

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


def test_drop_mask_builder():
    assert_rule(DropMaskBuilder, """
        def forward(self, q, k, attention_mask):
            scores = q @ k
            if attention_mask is None and scores.shape[2] == scores.shape[3]:
                attention_mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
                attention_mask.tril_()
                attention_mask = ~attention_mask
            if attention_mask is not None:
                scores = scores.masked_fill(attention_mask, float("-inf"))
            return scores
    """, """
        def forward(self, q, k, attention_mask):
            scores = q @ k
            # surgery: test/rule: built-in causal mask removed; the attention_mask input masks
            if attention_mask is not None:
                scores = scores.masked_fill(attention_mask, float("-inf"))
            return scores
    """)
    assert_rule(DropMaskBuilder, """
        def get_masks(self, ids):
            full_attention_mask = torch.ones(1, 4, 4)
            full_attention_mask.tril_()
            return full_attention_mask
    """, None)


def test_additive_mask():
    assert_rule(AdditiveMask, """
        if attention_mask is not None:
            attention_scores = attention_scores.masked_fill(attention_mask, float("-inf"))
        other = other.masked_fill(padding, 0.0)
    """, """
        if attention_mask is not None:
            # surgery: test/rule: additive mask
            attention_scores = attention_scores + attention_mask
        other = other.masked_fill(padding, 0.0)
    """)


def test_bool_mask_to_additive():
    assert_rule(partial(BoolMaskToAdditive, "get_masks", "-10000.0"), """
        def get_masks(self, input_ids, past_key_values, padding_mask=None):
            full_attention_mask = (full_attention_mask < 0.5).bool()
            full_attention_mask.unsqueeze_(1)
            return full_attention_mask

        def other(self, x):
            x = (x < 0.5).bool()
    """, """
        def get_masks(self, input_ids, past_key_values, padding_mask=None):
            # surgery: test/rule: additive mask
            full_attention_mask = (full_attention_mask < 0.5).float() * -10000.0
            full_attention_mask.unsqueeze_(1)
            return full_attention_mask

        def other(self, x):
            x = (x < 0.5).bool()
    """)


def test_unguard_call():
    assert_rule(partial(UnguardCall, "get_masks"), """
        if full_attention_mask is None:
            if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq_length != 1):
                full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)
    """, """
        if full_attention_mask is None:
            # surgery: test/rule: `get_masks` always runs: the attention no longer masks by itself
            full_attention_mask = self.get_masks(input_ids, past_key_values, padding_mask=attention_mask)
    """)
    assert_rule(partial(UnguardCall, "get_masks"), """
        if padded:
            mask = self.get_masks(ids)
        else:
            mask = None
    """, None)
