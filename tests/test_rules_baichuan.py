"""Exact before/after for the Baichuan2 rules (patches/baichuan_rules.py), on snippets in the upstream shapes."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.baichuan_rules import (
    EagerSdpa,
    FoldedNormHead,
    ImportOrNone,
    TensorsOnCpuInInit,
    UnwrapOneTuple,
)


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




def test_folded_norm_head():
    for fold in ("self.weight.data = nn.functional.normalize(self.weight)",
                 "self.weight = nn.Parameter(nn.functional.normalize(self.weight))"):
        assert_rule(partial(FoldedNormHead, "NormHead"), f"""
            class NormHead(nn.Module):
                def forward(self, hidden_states):
                    if self.training:
                        norm_weight = nn.functional.normalize(self.weight)
                    elif self.first_flag:
                        self.first_flag = False
                        {fold}
                        norm_weight = self.weight
                    else:
                        norm_weight = self.weight
                    return nn.functional.linear(hidden_states, norm_weight)
        """, """
            class NormHead(nn.Module):
                def forward(self, hidden_states):
                    # surgery: test/rule: rows normalized in torch; export writes them folded into the head's table
                    weight = self.weight if torch.jit.is_tracing() else nn.functional.normalize(self.weight)
                    return nn.functional.linear(hidden_states, weight)
        """)
    assert_rule(partial(FoldedNormHead, "NormHead"), """
        class Head(nn.Module):
            def forward(self, x):
                return F.linear(x, F.normalize(self.weight))
    """, None)


def test_tensors_on_cpu_in_init():
    assert_rule(partial(TensorsOnCpuInInit, "RotaryEmbedding"), """
        class RotaryEmbedding(torch.nn.Module):
            def __init__(self, dim, base=10000):
                super().__init__()
                self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
                self.cos_cached = self.inv_freq.cos()

            def forward(self, x):
                return self.cos_cached
    """, """
        class RotaryEmbedding(torch.nn.Module):
            def __init__(self, dim, base=10000):
                super().__init__()
                # surgery: test/rule: transformers 5 would leave these tensors on the meta device
                with torch.device("cpu"):
                    self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
                    self.cos_cached = self.inv_freq.cos()

            def forward(self, x):
                return self.cos_cached
    """)
    assert_rule(partial(TensorsOnCpuInInit, "RotaryEmbedding"), """
        class Attention:
            def __init__(self):
                self.x = torch.ones(2)
    """, None)


def test_unwrap_one_tuple():
    assert_rule(partial(UnwrapOneTuple, "gradient_checkpointing"), """
        class BaichuanConfig(PretrainedConfig):
            def __init__(self, gradient_checkpointing=False):
                self.gradient_checkpointing = (gradient_checkpointing,)
    """, """
        class BaichuanConfig(PretrainedConfig):
            def __init__(self, gradient_checkpointing=False):
                # surgery: test/rule: `gradient_checkpointing` a bool, not a 1-tuple (always truthy)
                self.gradient_checkpointing = gradient_checkpointing
    """)
    assert_rule(partial(UnwrapOneTuple, "gradient_checkpointing"), "self.gradient_checkpointing = flag\n", None)


def test_import_or_none():
    assert_rule(partial(ImportOrNone, "accelerate"), """
        import torch
        from accelerate import init_empty_weights

        logger = None
    """, """
        import torch
        # surgery: test/rule: accelerate is optional: only its 4-bit loader uses it
        try:
            from accelerate import init_empty_weights
        except ImportError:
            init_empty_weights = None

        logger = None
    """)
    assert_rule(partial(ImportOrNone, "accelerate"), "from accelerate.utils import x\n", None)
