"""Exact before/after for the rules of transformers-4.3x Llama-structured remote code
(patches/llama_remote_rules.py: InternLM2, MiniCPM), on snippets in the upstream shapes."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.llama_remote_rules import (
    CacheObjectToTuple,
    EagerAttentionClass,
    ImportWithFallback,
    PresentBeforeCacheConcat,
    RotaryFromKwargs,
)


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


CACHE_CONCAT = """
    def forward(self, hidden_states, past_key_value=None, use_cache=False, **kwargs):
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)

        if past_key_value is not None:
            # reuse k, v, self_attention
            key_states = torch.cat([past_key_value[0], key_states], dim=2)
            value_states = torch.cat([past_key_value[1], value_states], dim=2)

        past_key_value = {store}
        return attn_output, attn_weights, past_key_value
"""


def test_present_before_cache_concat():
    store = "(key_states, value_states) if use_cache else None"
    assert_rule(PresentBeforeCacheConcat, CACHE_CONCAT.format(store=store), """
        def forward(self, hidden_states, past_key_value=None, use_cache=False, **kwargs):
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)

            # surgery: test/rule: this step's K/V, before the cache is concatenated
            present = (key_states, value_states)
            if past_key_value is not None:
                # reuse k, v, self_attention
                key_states = torch.cat([past_key_value[0], key_states], dim=2)
                value_states = torch.cat([past_key_value[1], value_states], dim=2)

            # surgery: test/rule: store this step's K/V
            past_key_value = present if use_cache else None
            return attn_output, attn_weights, past_key_value
    """)


def test_present_before_cache_concat_plain_store():
    assert_rule(partial(PresentBeforeCacheConcat, "past_key_value"),
                CACHE_CONCAT.format(store="(key_states, value_states)"), """
        def forward(self, hidden_states, past_key_value=None, use_cache=False, **kwargs):
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)

            # surgery: test/rule: this step's K/V, before the cache is concatenated
            present = (key_states, value_states)
            if past_key_value is not None:
                # reuse k, v, self_attention
                key_states = torch.cat([past_key_value[0], key_states], dim=2)
                value_states = torch.cat([past_key_value[1], value_states], dim=2)

            # surgery: test/rule: store this step's K/V
            past_key_value = present
            return attn_output, attn_weights, past_key_value
    """)


def test_present_before_cache_concat_no_anchor():
    # a Cache object's update() (no torch.cat), or a store before the concat: not this rule's shape
    assert_rule(PresentBeforeCacheConcat, """
        def forward(self, past_key_value=None):
            if past_key_value is not None:
                key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx)
            return attn_output, attn_weights, past_key_value
    """, None)
    assert_rule(PresentBeforeCacheConcat, """
        def forward(self, past_key_value=None):
            past_key_value = (key_states, value_states)
            if past_key_value is not None:
                key_states = torch.cat([past_key_value[0], key_states], dim=2)
    """, None)


def test_cache_object_to_tuple():
    assert_rule(CacheObjectToTuple, """
        def forward(self, hidden_states, past_key_value=None, **kwargs):
            kv_seq_len = key_states.shape[-2]
            if past_key_value is not None:
                kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)
            cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)

            if past_key_value is not None:
                cache_kwargs = {"sin": sin, "cos": cos}
                key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)

            attn_output = self.o_proj(attend(query_states, key_states, value_states))
            return attn_output, attn_weights, past_key_value
    """, """
        def forward(self, hidden_states, past_key_value=None, **kwargs):
            kv_seq_len = key_states.shape[-2]
            # surgery: test/rule: history length from the tuple
            if past_key_value is not None:
                kv_seq_len += past_key_value[0].shape[-2]
            cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)

            # surgery: test/rule: this step's K/V; history is a (k, v) tuple
            present = (key_states, value_states)
            if past_key_value is not None:
                key_states = torch.cat([past_key_value[0], key_states], dim=2)
                value_states = torch.cat([past_key_value[1], value_states], dim=2)

            attn_output = self.o_proj(attend(query_states, key_states, value_states))
            # surgery: test/rule: returns this step's K/V
            return attn_output, attn_weights, present
    """)
    # a tuple cache concatenated in place (InternLM2) is PresentBeforeCacheConcat's shape, not this one
    assert_rule(CacheObjectToTuple, CACHE_CONCAT.format(store="(key_states, value_states)"), None)


def test_eager_attention_class():
    assert_rule(partial(EagerAttentionClass, "ATTENTION_CLASSES", "Attention"), """
        class Layer:
            def __init__(self, config, layer_idx):
                self.self_attn = ATTENTION_CLASSES[config._attn_implementation](config=config, layer_idx=layer_idx)
    """, """
        class Layer:
            def __init__(self, config, layer_idx):
                # surgery: test/rule: eager attention only (no SDPA/flash class)
                self.self_attn = Attention(config=config, layer_idx=layer_idx)
    """)
    assert_rule(partial(EagerAttentionClass, "ATTENTION_CLASSES", "Attention"), "x = OTHER[k](c)\n", None)


FALLBACK = '''
def helper(mask):
    return mask
'''


def test_import_with_fallback():
    assert_rule(partial(ImportWithFallback, "transformers.gone", FALLBACK), """
        import torch
        from transformers.gone import helper
        from transformers.kept import other
    """, """
        import torch
        # surgery: test/rule: transformers.gone is gone in transformers 5
        try:
            from transformers.gone import helper
        except ImportError:
            def helper(mask):
                return mask
        from transformers.kept import other
    """)
    assert_rule(partial(ImportWithFallback, "transformers.gone", FALLBACK), """
        try:
            from transformers.gone import helper
        except ImportError:
            helper = None
    """, None)
