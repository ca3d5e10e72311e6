"""Exact before/after for every rule in `patches/native_rules.py` (both cache argument names where a rule
reads one: transformers 5.24 renamed `past_key_values` to `cache`), and where each finds no anchor."""

from __future__ import annotations

from functools import partial

import libcst as cst
import pytest

from surgery.codemod import Outcome, Patch, markers, run_patch
from surgery.codemod_testing import assert_rule
from surgery.patches.native_rules import (
    AbsoluteImports,
    CacheToPresent,
    EagerAttention,
    EagerAttentionIf,
    LayerReturnsPresent,
    MaskAsGiven,
    ModelUnpacksLayer,
)


def test_absolute_imports_resolves_each_level():
    assert_rule(partial(AbsoluteImports, "transformers.models.llama"), """
        import torch
        from ...utils import logging, auto_docstring
        from .configuration_llama import LlamaConfig
        from ..auto import AutoModel
        from transformers.cache_utils import Cache
    """, """
        import torch
        # surgery: test/rule: absolute import
        from transformers.utils import logging, auto_docstring
        # surgery: test/rule: absolute import
        from transformers.models.llama.configuration_llama import LlamaConfig
        # surgery: test/rule: absolute import
        from transformers.models.auto import AutoModel
        from transformers.cache_utils import Cache
    """)
    assert_rule(partial(AbsoluteImports, "transformers.models.llama"), "import torch\nfrom a.b import c\n", None)


def test_eager_attention_takes_the_lookups_fallback():
    assert_rule(EagerAttention, """
        def forward(self, x):
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            return attention_interface(self, x)
    """, """
        def forward(self, x):
            # surgery: test/rule: eager attention only (no SDPA/flash dispatch)
            attention_interface: Callable = eager_attention_forward
            return attention_interface(self, x)
    """)
    assert_rule(EagerAttention, "attention_interface = ALL_ATTENTION_FUNCTIONS[impl]\n", None)


BRANCH_4X = """
    def forward(self, x):
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            if self.config._attn_implementation == "sdpa" and kwargs.get("output_attentions", False):
                logger.warning_once("sdpa cannot return weights")
            else:
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

        attn_output, attn_weights = attention_interface(self, x)
        return attn_output, attn_weights
"""


def test_eager_attention_if_removes_the_branch_and_marks_the_next_statement():
    assert_rule(EagerAttentionIf, BRANCH_4X, """
        def forward(self, x):
            attention_interface: Callable = eager_attention_forward

            # surgery: test/rule: eager attention only (the _attn_implementation branch was removed)
            attn_output, attn_weights = attention_interface(self, x)
            return attn_output, attn_weights
    """)


def test_eager_attention_if_at_the_end_of_a_block_leaves_a_marked_pass():
    assert_rule(EagerAttentionIf, """
        def forward(self, x):
            attention_interface = eager_attention_forward
            if self.config._attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    """, """
        def forward(self, x):
            attention_interface = eager_attention_forward
            # surgery: test/rule: eager attention only (the _attn_implementation branch was removed)
            pass
    """)
    assert_rule(EagerAttentionIf, """
        def forward(self, x):
            if self.config._attn_implementation == "sdpa":
                warn()
    """, None)


def test_eager_attention_patch_reruns_as_already_applied():
    """Both rules of the patch leave a marker, so a second apply on either style reports `already applied`."""
    patch = Patch("eager-attention", "eager only", [EagerAttention, EagerAttentionIf])
    module = cst.parse_module(BRANCH_4X.replace("\n    ", "\n").lstrip())
    once, first = run_patch(patch, "p", "m.py", module, markers(module))
    twice, second = run_patch(patch, "p", "m.py", once, markers(once))
    assert (first.rule, first.outcome, second.outcome) == (EagerAttentionIf.name, Outcome.APPLIED,
                                                           Outcome.ALREADY_APPLIED)


def test_mask_as_given_replaces_every_builder_call():
    assert_rule(MaskAsGiven, """
        def forward(self, input_ids, attention_mask, cache_position):
            causal_mask = create_causal_mask(config=self.config, input_embeds=x, attention_mask=attention_mask)
            sliding = create_sliding_window_causal_mask(self.config, x, attention_mask)
            other = mask_function(attention_mask)
            keep = make_mask(attention_mask)
            return causal_mask, sliding, other, keep
    """, """
        def forward(self, input_ids, attention_mask, cache_position):
            # surgery: test/rule: the attention_mask input is used as given
            causal_mask = attention_mask
            # surgery: test/rule: the attention_mask input is used as given
            sliding = attention_mask
            # surgery: test/rule: the attention_mask input is used as given
            other = attention_mask
            keep = make_mask(attention_mask)
            return causal_mask, sliding, other, keep
    """)
    assert_rule(MaskAsGiven, "mask = make_mask(attention_mask)\nm = create_causal(x)\n", None)


@pytest.mark.parametrize("cache", ["past_key_values", "cache"])
def test_cache_to_present_takes_either_cache_name(cache: str):
    """transformers 5.24 renamed the attention's `past_key_values` argument to `cache`."""
    assert_rule(CacheToPresent, f"""
        def forward(self, h, {cache}=None):
            k, v = self.k(h), self.v(h)
            if {cache} is not None:
                k, v = {cache}.update(k, v, self.layer_idx)
            return attn(k, v), w
    """, f"""
        def forward(self, h, {cache}=None):
            k, v = self.k(h), self.v(h)
            # surgery: test/rule: this step's K/V, BSHD
            present = (k.transpose(1, 2), v.transpose(1, 2))
            if {cache} is not None:
                k = torch.cat(({cache}[0].transpose(1, 2), k), dim=2)
                v = torch.cat(({cache}[1].transpose(1, 2), v), dim=2)
            # surgery: test/rule: returns present
            return attn(k, v), present
    """)


def test_cache_to_present_needs_a_forward_returning_a_pair():
    update = "    if past_key_values is not None:\n        k, v = past_key_values.update(k, v, 0)\n"
    assert_rule(CacheToPresent, "def forward(self, k, v, past_key_values):\n" + update + "    return k\n", None)
    assert_rule(CacheToPresent, "def other(self, k, v, past_key_values):\n" + update + "    return k, v\n", None)


@pytest.mark.parametrize("cache", ["past_key_values", "cache"])
def test_layer_returns_present(cache: str):
    assert_rule(LayerReturnsPresent, f"""
        def forward(self, hidden_states, attention_mask=None, {cache}=None):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, {cache}={cache})
            hidden_states = residual + hidden_states
            return hidden_states
    """, f"""
        def forward(self, hidden_states, attention_mask=None, {cache}=None):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            # surgery: test/rule: keep this step's K/V
            hidden_states, present = self.self_attn(hidden_states=hidden_states, {cache}={cache})
            hidden_states = residual + hidden_states
            return hidden_states, present
    """)


def test_layer_returns_present_needs_the_pair_assignment_and_a_plain_return():
    assert_rule(LayerReturnsPresent, """
        def forward(self, hidden_states):
            hidden_states = self.self_attn(hidden_states)
            return hidden_states
    """, None)
    assert_rule(LayerReturnsPresent, """
        def forward(self, hidden_states):
            hidden_states, _ = self.self_attn(hidden_states)
            return hidden_states, None
    """, None)


@pytest.mark.parametrize("cache", ["past_key_values", "cache"])
def test_model_unpacks_layer_and_passes_no_cache(cache: str):
    assert_rule(ModelUnpacksLayer, f"""
        def forward(self, inputs_embeds, {cache}=None):
            hidden_states = inputs_embeds
            for decoder_layer in self.layers:
                hidden_states = decoder_layer(hidden_states, attention_mask=mask, {cache}={cache}, use_cache=True)
            return hidden_states
    """, f"""
        def forward(self, inputs_embeds, {cache}=None):
            hidden_states = inputs_embeds
            for decoder_layer in self.layers:
                # surgery: test/rule: layers return (hidden, present); no cache object
                hidden_states, _ = decoder_layer(hidden_states, attention_mask=mask, {cache}=None, use_cache=True)
            return hidden_states
    """)
    assert_rule(ModelUnpacksLayer, "hidden_states, _ = decoder_layer(h)\nh = layer(h)\n", None)
