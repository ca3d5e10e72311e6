"""InternVL (remote code, `model_type: internvl_chat`) as export data: the language model under
`language_model` (transformers' Qwen2/Llama, patched by the pack), its config under `llm_config`, and the
InternViT tower + pixel shuffle + `mlp1` projector as one `vision` graph of one square tile.

Torch-free (packs import it for `surgery list`); the graph module is export/internvl_vision.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec, native_block
from surgery.export.vision_spec import VisionSpec

if TYPE_CHECKING:
    import torch

# InternVL's own preprocessing (the model card's load_image / build_transform): RGB, Resize((S, S), BICUBIC),
# ToTensor, Normalize with ImageNet statistics; the checkpoints ship no processor config that says otherwise
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TOKENS = {"vision_start_token_id": "<img>", "vision_end_token_id": "</img>", "image_token_id": "<IMG_CONTEXT>"}


def token_ids(model_dir: Path, names: dict[str, str]) -> dict[str, int]:
    """Ids of special tokens, read from the tokenizer files (tokenizer.json's added tokens, or
    tokenizer_config.json's added_tokens_decoder) without loading a tokenizer."""
    found: dict[str, int] = {}
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        found |= {t["content"]: t["id"] for t in json.loads(path.read_text()).get("added_tokens", [])}
    path = Path(model_dir) / "tokenizer_config.json"
    if path.is_file():
        decoder = json.loads(path.read_text()).get("added_tokens_decoder") or {}
        found |= {t["content"]: int(i) for i, t in decoder.items()}
    missing = [t for t in names.values() if t not in found]
    if missing:
        raise SurgeryError(f"{model_dir}: the tokenizer files define no {', '.join(missing)} token; copy the "
                           "original model's tokenizer files next to config.json and re-run apply")
    return {key: found[token] for key, token in names.items()}


def conversation_system(model_dir: Path, template: str | None) -> str | None:
    """The system message chat() puts first: `system_message=` of the `Conversation(name=<template>, ...)` that
    the model's conversation.py registers, read by parsing the file (never running it); None when the file or the
    template is not there (then the tokenizer's chat template decides)."""
    import libcst as cst
    import libcst.matchers as m

    path = Path(model_dir) / "conversation.py"
    if template is None or not path.is_file():
        return None
    try:
        module = cst.parse_module(path.read_text(encoding="utf-8"))
    except (cst.ParserSyntaxError, UnicodeDecodeError):
        return None
    for call in m.findall(module, m.Call(func=m.Name("Conversation"))):
        values = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
        name, system = values.get("name"), values.get("system_message")
        if isinstance(name, cst.BaseString) and name.evaluated_value == template:
            return system.evaluated_value if isinstance(system, cst.BaseString) else None
    return None


@dataclass(frozen=True)
class InternVisionSpec(VisionSpec):
    """InternViT: the whole image [1, 3, S, S] in, one embedding per 2x2 patches (downsample ratio 0.5) out."""

    def geometry(self, config: object) -> dict[str, int]:
        vision = getattr(config, self.config)
        return {"patch_size": vision.patch_size, "merge_size": round(1 / config.downsample_ratio),
                "channels": getattr(vision, "num_channels", 3)}

    def size(self, config: object) -> tuple[int, int]:
        side = getattr(config, "force_image_size", None) or getattr(config, self.config).image_size
        return side, side

    def grid(self, config: object, size: tuple[int, int]) -> tuple[int, int]:
        geo = self.geometry(config)
        step = geo["patch_size"] * geo["merge_size"]
        if size[0] != size[1]:
            raise SurgeryError(f"--image-size {size[0]}x{size[1]}: InternVL takes square tiles (its feature "
                               f"extractor assumes a square grid); give one size such as {self.size(config)[0]}")
        if size[0] <= 0 or size[0] % step:
            raise SurgeryError(f"--image-size {size[0]}: must be a positive multiple of {step} (patch "
                               f"{geo['patch_size']} x pixel shuffle {geo['merge_size']})")
        return size[0] // geo["patch_size"], size[1] // geo["patch_size"]

    def input_shape(self, config: object, grid: tuple[int, int]) -> tuple[int, ...]:
        geo = self.geometry(config)
        return 1, geo["channels"], grid[0] * geo["patch_size"], grid[1] * geo["patch_size"]

    def build(self, model: object, grid: tuple[int, int]) -> object:
        from surgery.export.internvl_vision import InternVisionGraph

        return InternVisionGraph(model, grid)

    def needs(self) -> tuple[str, ...]:
        return (self.path, "mlp1")

    def record(self, model_dir: Path, config: object, raw_config: dict, spec: object, size: tuple[int, int],
               seq: int) -> dict:
        grid = self.grid(config, size)
        geo = self.geometry(config)
        tokens = grid[0] * grid[1] // geo["merge_size"] ** 2
        if tokens + 3 > seq:
            raise SurgeryError(f"an image of {size[0]}x{size[1]} is {tokens} tokens, which leaves no room for a "
                               f"prompt in --seq-length {seq}; export a smaller --image-size or a longer --seq-length")
        return {
            "graph": "vision", "image_size": list(size), "grid": list(grid), "tokens": tokens,
            "pixel_layout": "NCHW",  # pixel_values [1, C, H, W]: the normalized image itself, no patchify
            "resample": "bicubic", "rescale_factor": 1 / 255, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
            "preprocessing": "InternVL load_image/build_transform: RGB, Resize((H, W), bicubic), ToTensor (/255), "
                             "Normalize(ImageNet mean/std)",
            "tiling": {"max_num": 1, "tiles": 1, "use_thumbnail": bool(raw_config.get("use_thumbnail")),
                       "rule": "dynamic_preprocess with max_num=1: one tile of the whole image resized to "
                               "image_size; no thumbnail is added to a single tile"},
            **geo, "downsample_ratio": raw_config.get("downsample_ratio", 0.5),
            **token_ids(model_dir, TOKENS), "text_after_image": "\n", "positions": "1-D",
            # chat(): the conversation template's system message, given to the tokenizer's chat template
            "system_message": conversation_system(model_dir, raw_config.get("template")),
            "prompt": "<img> then `tokens` <IMG_CONTEXT> tokens (rows replaced by image_embeds) then </img>, a "
                      "newline and the question (InternVL chat(): '<image>\\n' + question)",
        }


def internvl_rope(model: torch.nn.Module, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's own rotary table for SEQ positions, [seq, D], in the dtype the model computes in (its
    rotary module computes in float32 and casts to the activations' dtype, as the model does at run time)."""
    import torch

    probe = torch.zeros(1, dtype=model.language_model.model.embed_tokens.weight.dtype)
    cos, sin = model.language_model.model.rotary_emb(probe, torch.arange(seq)[None])
    return cos[0].detach().clone(), sin[0].detach().clone()


INTERNVL_SPEC = ArchSpec(
    embedding="language_model.model.embed_tokens",
    layers="language_model.model.layers",
    final_norm="language_model.model.norm",
    lm_head="language_model.lm_head",
    rope_tables=internvl_rope,
    call_block=native_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    text_config=lambda c: c.llm_config,
    vision=InternVisionSpec(path="vision_model", config="vision_config", default_size=(448, 448),
                            wrapper="InternVisionGraph"),
)
