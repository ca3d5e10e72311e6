"""Exact before/after for the transformers 5 load rules (patches/load_rules.py), on snippets in the upstream shapes."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.load_rules import CallLastInMethod, GuardConfigRead, TensorsOnCpuInInit, UnwrapOneTuple

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
