"""Exact before/after for InternVL's rules (patches/internvl_rules.py), and the snippets where each finds no
anchor."""

from __future__ import annotations

from functools import partial

from surgery.codemod_testing import assert_rule
from surgery.patches.internvl_rules import ForceLocalAssignment, ImportFromLocalCopy

FLASH = partial(ForceLocalAssignment, "Chat", "__init__", "use_flash_attn", "False")
COPIES = {"Qwen2ForCausalLM": "modeling_qwen2", "LlamaForCausalLM": "modeling_llama"}


def test_import_from_local_copy_keeps_the_other_names():
    assert_rule(partial(ImportFromLocalCopy, "transformers", COPIES), """
        import torch
        from transformers import (AutoModel, GenerationConfig, LlamaForCausalLM,
                                  Qwen2ForCausalLM)
        from transformers.utils import logging
    """, """
        import torch
        from transformers import (AutoModel, GenerationConfig)
        # surgery: test/rule: LlamaForCausalLM, Qwen2ForCausalLM from the pack's patched copy, not transformers
        from .modeling_llama import LlamaForCausalLM
        from .modeling_qwen2 import Qwen2ForCausalLM
        from transformers.utils import logging
    """)


def test_import_from_local_copy_replaces_an_import_of_only_copied_names():
    assert_rule(partial(ImportFromLocalCopy, "transformers", COPIES), """
        import torch

        from transformers import Qwen2ForCausalLM as LM
    """, """
        import torch

        # surgery: test/rule: Qwen2ForCausalLM from the pack's patched copy, not transformers
        from .modeling_qwen2 import Qwen2ForCausalLM as LM
    """)


def test_import_from_local_copy_finds_no_anchor():
    rule = partial(ImportFromLocalCopy, "transformers", COPIES)
    assert_rule(rule, "from transformers import AutoModel\n", None)
    assert_rule(rule, "from .modeling_internlm2 import InternLM2ForCausalLM\n", None)
    assert_rule(rule, "from transformers.models.qwen2 import Qwen2ForCausalLM\n", None)


def test_force_local_assignment():
    assert_rule(FLASH, """
        use_flash_attn = True

        class Chat(Base):
            def __init__(self, config, use_flash_attn=True):
                super().__init__(config)
                use_flash_attn = use_flash_attn if has_flash_attn else False
                config.vision_config.use_flash_attn = True if use_flash_attn else False

            def other(self):
                use_flash_attn = True
    """, """
        use_flash_attn = True

        class Chat(Base):
            def __init__(self, config, use_flash_attn=True):
                super().__init__(config)
                # surgery: test/rule: was `use_flash_attn if has_flash_attn else False`
                use_flash_attn = False
                config.vision_config.use_flash_attn = True if use_flash_attn else False

            def other(self):
                use_flash_attn = True
    """)


def test_force_local_assignment_finds_no_anchor():
    assert_rule(FLASH, """
        class Other:
            def __init__(self):
                use_flash_attn = True

        class Chat:
            def __init__(self):
                self.use_flash_attn = True
    """, None)


def test_drop_path_fallback_of_the_pack():
    from surgery.patches.import_rules import ImportWithFallback
    from surgery.patches.internvl import DROP_PATH

    assert_rule(partial(ImportWithFallback, "timm.models.layers", DROP_PATH, note="timm is optional"), """
        import torch
        from timm.models.layers import DropPath
    """, '''
        import torch
        # surgery: test/rule: timm is optional
        try:
            from timm.models.layers import DropPath
        except ImportError:
            class DropPath(torch.nn.Identity):
                """timm's stochastic depth: the identity outside training, which is all loading and export run."""

                def __init__(self, drop_prob=0.0, scale_by_keep=True):
                    super().__init__()
    ''')


def test_text_model_from_copy():
    from surgery.patches.internvl_rules import TextModelFromCopy

    assert_rule(partial(TextModelFromCopy, {"qwen2": ("modeling_qwen2", "Qwen2Model")}), """
        import torch
        from ..auto import AutoModel


        class InternVLModel(Base):
            def __init__(self, config):
                self.vision_tower = AutoModel.from_config(config.vision_config)
                self.language_model = AutoModel.from_config(config.text_config)
    """, """
        import torch
        from ..auto import AutoModel


        # surgery: test/rule: builds the copied decoder
        def _surgery_text_model(config):
            if config.model_type == 'qwen2':
                from .modeling_qwen2 import Qwen2Model

                return Qwen2Model(config)
            raise ValueError(f"no patched copy for a {config.model_type} language model; the pack copied qwen2")


        class InternVLModel(Base):
            def __init__(self, config):
                self.vision_tower = AutoModel.from_config(config.vision_config)
                # surgery: test/rule: the decoder from the pack's patched copy, not the AutoModel registry
                self.language_model = _surgery_text_model(config.text_config)
    """)
    assert_rule(partial(TextModelFromCopy, {"qwen2": ("modeling_qwen2", "Qwen2Model")}),
                "self.vision_tower = AutoModel.from_config(config.vision_config)\n", None)
