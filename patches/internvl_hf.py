"""transformers' native InternVL (`model_type: internvl`, `InternVLForConditionalGeneration`): the `-hf`
checkpoints (OpenGVLab/InternVL3-1B-hf ... 78B-hf, InternVL3.5 -HF).

Its modeling file builds the language model through `AutoModel.from_config(config.text_config)`, i.e. from
transformers' own registry: the pack copies the installed modeling file of each language-model family it
supports beside the model with the native patches, and rewrites that call to build the decoder from the copy
(`text-model-copy`). The vision attention's SDPA/flash dispatch becomes eager like any native file's.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from surgery.codemod import Patch
from surgery.errors import SurgeryError
from surgery.export.internvl_hf_spec import INTERNVL_HF_SPEC
from surgery.packs import ApplyOptions, Pack

from .internvl_rules import TextModelFromCopy
from .native_rules import AbsoluteImports, EagerAttention, EagerAttentionIf, native_patches

DECODERS = {"qwen2": "Qwen2Model", "qwen3": "Qwen3Model", "llama": "LlamaModel"}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

PATCHES = [
    Patch("absolute-imports", "make the copied file's relative imports absolute",
          [partial(AbsoluteImports, "transformers.models.internvl")]),
    Patch("eager-attention", "always the eager attention function in the vision tower (no SDPA/flash dispatch)",
          [EagerAttention, EagerAttentionIf]),
    Patch("text-model-copy", "the language model from the pack's patched copy of its transformers file",
          [partial(TextModelFromCopy, {kind: (f"modeling_{kind}", cls) for kind, cls in DECODERS.items()})]),
]


def check_config(config: Mapping[str, object]) -> None:
    """Refuse a language model the pack has no patched copy for, before anything is written."""
    kind = (config.get("text_config") or {}).get("model_type", "qwen2")  # InternVLConfig's default text model
    if kind not in DECODERS:
        raise SurgeryError(f"this InternVL's language model is {kind!r}; the internvl_hf pack handles "
                           f"{', '.join(DECODERS)}")


def config_edits(opts: ApplyOptions) -> dict[str, object]:
    edits: dict[str, object] = {"auto_map": {"AutoModelForCausalLM":
                                             "modeling_internvl.InternVLForConditionalGeneration"},
                                "use_cache": False}
    if opts.dtype:
        edits["dtype"] = DTYPE_NAMES[opts.dtype]
    return edits


PACK = Pack(
    name="internvl_hf",
    version="1.0.0",
    summary="InternVL -hf checkpoints (transformers modeling_internvl): vision graph + decoder fed image "
            "embeddings",
    model_types=("internvl",),
    architectures=("InternVLForConditionalGeneration",),
    files={"modeling_internvl.py": PATCHES,
           **{f"modeling_{kind}.py": native_patches(kind) for kind in DECODERS}},
    sources={"modeling_internvl.py": "models/internvl/modeling_internvl.py",
             **{f"modeling_{kind}.py": f"models/{kind}/modeling_{kind}.py" for kind in DECODERS}},
    config_edits=config_edits,
    checked_with=">=5.24,<6",
    export_spec=INTERNVL_HF_SPEC,
    check_config=check_config,
)
