"""Exact before/after for the eager-attention rules (patches/attention_rules.py), on snippets in the upstream shapes."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.attention_rules import EagerAttentionClass, EagerSdpa


def test_eager_sdpa_unwraps_the_kernel_context():
    assert_rule(EagerSdpa, """
        def forward(self, q, k, v, attention_mask):
            with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            return out.transpose(1, 2)
    """, """
        def forward(self, q, k, v, attention_mask):
            # surgery: test/rule: eager attention: scores + additive mask, softmax, values
            out = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            if attention_mask is not None:
                out = out + attention_mask
            out = torch.matmul(torch.softmax(out, dim=-1), v)
            return out.transpose(1, 2)
    """)


def test_eager_sdpa_positional_mask_and_refusals():
    assert_rule(EagerSdpa, "o = F.scaled_dot_product_attention(q, k, v, m)\n", """
        # surgery: test/rule: eager attention: scores + additive mask, softmax, values
        o = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        if m is not None:
            o = o + m
        o = torch.matmul(torch.softmax(o, dim=-1), v)
    """)
    assert_rule(EagerSdpa, "o = F.scaled_dot_product_attention(q, k, v, is_causal=True)\n", None)
    assert_rule(EagerSdpa, "with torch.backends.cuda.sdp_kernel():\n    o = attend(q, k, v)\n", None)


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
