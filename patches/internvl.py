"""InternVL chat remote code (`model_type: internvl_chat`: InternVL2 / 2.5 / 3 / 3.5 as OpenGVLab ships them with
`modeling_internvl_chat.py` + `modeling_intern_vit.py`), with a Qwen2, Qwen3 or Llama language model.

The language model is transformers' own class, which the chat model imports by name: the pack copies the
installed `modeling_qwen2.py` / `modeling_qwen3.py` / `modeling_llama.py` beside the remote code, runs the
native patches on them (history K/V in, this step's K/V out, the mask as given), and points the chat model's
import at those copies.
The vision tower needs no rewrite for export (its eager attention is already traceable) once flash attention
is off; the export wraps tower + pixel shuffle + projector into one `vision` graph (export/internvl_spec.py).
Two load-only patches make the upstream files load on transformers 5: timm's DropPath (the identity at
inference) gets a fallback, and the chat model calls `post_init()`, which transformers 5 needs to finish loading.

InternLM2-based InternVL (InternVL2-2B/8B/26B, InternVL2.5-2B/8B/26B, `modeling_internlm2.py` shipped beside
it) is refused in one line: its language model lives under other names and needs the internlm2 pack's rules;
so are the MoE and GPT-OSS language models of some InternVL3.5 sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from surgery.codemod import Patch
from surgery.errors import SurgeryError
from surgery.export.internvl_spec import INTERNVL_SPEC
from surgery.packs import ApplyOptions, Pack

from .import_rules import ImportWithFallback
from .internvl_rules import ForceLocalAssignment, ImportFromLocalCopy
from .load_rules import CallLastInMethod
from .native_rules import native_patches

TIMM = ("timm.models.layers", "timm.layers")  # DropPath's home before and after timm 0.9
LANGUAGE_MODELS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
DROP_PATH = '''
class DropPath(torch.nn.Identity):
    """timm's stochastic depth: the identity outside training, which is all loading and export run."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
'''

VIT_PATCHES = [
    Patch("timm-optional", "timm's DropPath import gets an identity fallback (timm is a training dependency)",
          [partial(ImportWithFallback, module, DROP_PATH, note=f"{module} is optional: DropPath is the identity "
                                                                 "at inference") for module in TIMM],
          required=False, absent_reason="this revision does not import timm"),
]
CHAT_PATCHES = [
    Patch("flash-off", "flash attention off in the constructor (not traceable; CUDA only): eager ViT and LLM",
          [partial(ForceLocalAssignment, "InternVLChatModel", "__init__", "use_flash_attn", "False")]),
    Patch("llm-copy", "the language model class from the pack's patched copy of its transformers file",
          [partial(ImportFromLocalCopy, "transformers", {k: f"modeling_{v}" for k, v in LANGUAGE_MODELS.items()})]),
    Patch("post-init", "the constructor ends with self.post_init(), which transformers 5 needs to finish a load",
          [partial(CallLastInMethod, "InternVLChatModel", "__init__", "self.post_init()",
                   note="transformers 5 finishes a loaded model in post_init")]),
]
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_config(config: Mapping[str, object]) -> None:
    """Refuse a language model the pack does not patch, before anything is written."""
    arch = ((config.get("llm_config") or {}).get("architectures") or ["?"])[0]
    if arch not in LANGUAGE_MODELS:
        raise SurgeryError(f"this InternVL's language model is {arch}; the internvl pack handles "
                           f"{', '.join(LANGUAGE_MODELS)} (InternVL3 1B-78B except 9B, InternVL2.5-1B/4B/38B/78B, "
                           "dense InternVL3.5)")


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    return {"torch_dtype": DTYPE_NAMES[opts.dtype]} if opts.dtype else {}


PACK = Pack(
    name="internvl",
    version="1.0.0",
    summary="InternVL2/2.5/3/3.5 chat remote code with a Qwen2, Qwen3 or Llama LLM: vision graph (InternViT + "
            "pixel shuffle + mlp1) + decoder fed image embeddings",
    model_types=("internvl_chat",),
    architectures=("InternVLChatModel",),
    files={"modeling_intern_vit.py": VIT_PATCHES, "modeling_internvl_chat.py": CHAT_PATCHES,
           **{f"modeling_{family}.py": native_patches(family) for family in LANGUAGE_MODELS.values()}},
    sources={f"modeling_{family}.py": f"models/{family}/modeling_{family}.py" for family in LANGUAGE_MODELS.values()},
    config_edits=config_edits,
    checked_with=">=5.24,<6",
    load_only=("timm-optional", "post-init"),
    export_spec=INTERNVL_SPEC,
    check_config=check_config,
)
