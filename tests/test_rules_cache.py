"""Exact before/after for the rules that make a block return this step's K/V (patches/cache_rules.py), on
snippets in the upstream shapes (InternLM2/Baichuan2, ChatGLM2/3, MiniCPM)."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.cache_rules import CacheObjectToTuple, PresentBeforeCacheConcat

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


GLM_PRESENT = partial(PresentBeforeCacheConcat, "kv_cache", store_note="return this step's K/V")


def test_present_before_cache_concat_store_nested_later():
    """chatglm2 from 2023-06-29, chatglm3, CodeGeeX2: the concat, then `if use_cache:`."""
    assert_rule(GLM_PRESENT, """
        def forward(self, key_layer, value_layer, kv_cache=None, use_cache=True):
            key_layer = rotate(key_layer)

            if kv_cache is not None:
                cache_k, cache_v = kv_cache
                key_layer = torch.cat((cache_k, key_layer), dim=0)
                value_layer = torch.cat((cache_v, value_layer), dim=0)
            if use_cache:
                kv_cache = (key_layer, value_layer)
            else:
                kv_cache = None
            return attend(key_layer, value_layer), kv_cache
    """, """
        def forward(self, key_layer, value_layer, kv_cache=None, use_cache=True):
            key_layer = rotate(key_layer)

            # surgery: test/rule: this step's K/V, before the cache is concatenated
            present = (key_layer, value_layer)
            if kv_cache is not None:
                cache_k, cache_v = kv_cache
                key_layer = torch.cat((cache_k, key_layer), dim=0)
                value_layer = torch.cat((cache_v, value_layer), dim=0)
            if use_cache:
                # surgery: test/rule: return this step's K/V
                kv_cache = present
            else:
                kv_cache = None
            return attend(key_layer, value_layer), kv_cache
    """)


def test_present_before_cache_concat_both_nested():
    """The first chatglm2 release (June 2023): the concat nested in `if use_cache:`."""
    assert_rule(GLM_PRESENT, """
        def forward(self, key_layer, value_layer, kv_cache=None, use_cache=True):
            if use_cache:
                if kv_cache is not None:
                    cache_k, cache_v = kv_cache
                    key_layer = torch.cat((cache_k, key_layer), dim=0)
                    value_layer = torch.cat((cache_v, value_layer), dim=0)
                kv_cache = (key_layer, value_layer)
            else:
                kv_cache = None
            return key_layer, kv_cache
    """, """
        def forward(self, key_layer, value_layer, kv_cache=None, use_cache=True):
            if use_cache:
                # surgery: test/rule: this step's K/V, before the cache is concatenated
                present = (key_layer, value_layer)
                if kv_cache is not None:
                    cache_k, cache_v = kv_cache
                    key_layer = torch.cat((cache_k, key_layer), dim=0)
                    value_layer = torch.cat((cache_v, value_layer), dim=0)
                # surgery: test/rule: return this step's K/V
                kv_cache = present
            else:
                kv_cache = None
            return key_layer, kv_cache
    """)
    # a concat with no `kv_cache = (k, v)` store in the same function is not this anchor
    assert_rule(GLM_PRESENT, """
        def forward(self, k, kv_cache=None):
            if kv_cache is not None:
                k = torch.cat((kv_cache[0], k), dim=0)
            return k
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
