"""Exact before/after for the ChatGLM2/3 rules (patches/chatglm_rules.py), on snippets in the upstream shapes."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.chatglm_rules import (
    AdditiveMask,
    BoolMaskToAdditive,
    CallLastInMethod,
    DropMaskBuilder,
    GuardConfigRead,
    PresentBeforeConcat,
    UnguardCall,
)

POST_INIT = partial(CallLastInMethod, "Model", "__init__", "self.post_init()", note="why")


def test_guard_config_read():
    assert_rule(partial(GuardConfigRead, "config", "max_length", "None"), """
        class M:
            def __init__(self, config):
                self.max_sequence_length = config.max_length
                self.n = config.num_layers
    """, """
        class M:
            def __init__(self, config):
                # surgery: test/rule: transformers 5 configs have no `max_length`
                self.max_sequence_length = getattr(config, "max_length", None)
                self.n = config.num_layers
    """)
    assert_rule(partial(GuardConfigRead, "config", "max_length", "None"), "x = generation.max_length\n", None)


def test_call_last_in_method():
    assert_rule(POST_INIT, """
        class Model(Base):
            def __init__(self, config):
                super().__init__(config)
                if config.quantization_bit:
                    self.quantize(config.quantization_bit)

            def forward(self, x):
                return x
    """, """
        class Model(Base):
            def __init__(self, config):
                super().__init__(config)
                if config.quantization_bit:
                    self.quantize(config.quantization_bit)
                # surgery: test/rule: why
                self.post_init()

            def forward(self, x):
                return x
    """)
    assert_rule(POST_INIT, """
        class Model(Base):
            def __init__(self, config):
                super().__init__(config)
                self.post_init()
    """, None)
    assert_rule(POST_INIT, "class Other:\n    def __init__(self):\n        pass\n", None)


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


def test_present_before_concat_flat():
    """chatglm2 from 2023-06-29, chatglm3, CodeGeeX2: the concat, then `if use_cache:`."""
    assert_rule(partial(PresentBeforeConcat, "kv_cache"), """
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


def test_present_before_concat_nested():
    """The first chatglm2 release (June 2023): the concat nested in `if use_cache:`."""
    assert_rule(partial(PresentBeforeConcat, "kv_cache"), """
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
    assert_rule(partial(PresentBeforeConcat, "kv_cache"), """
        def forward(self, k, kv_cache=None):
            if kv_cache is not None:
                k = torch.cat((kv_cache[0], k), dim=0)
            return k
    """, None)
