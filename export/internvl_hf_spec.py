"""transformers' native InternVL (`model_type: internvl`, `InternVLForConditionalGeneration`: the `-hf`
checkpoints such as OpenGVLab/InternVL3-1B-hf) as export data. The language model sits at
`model.language_model` (a Qwen2/Qwen3/Llama decoder the pack builds from its patched copy), the tower at
`model.vision_tower`; the image preprocessing is the checkpoint's GotOcr2 image processor, one tile.

Torch-free (packs import it for `surgery list`); the graph module is export/internvl_vision.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec, native_block
from surgery.export.internvl_spec import InternVisionSpec, token_ids
from surgery.export.vision_record import PREPROCESSOR, RESAMPLE
from surgery.export.vl_arch import qwen2_vl_rope


@dataclass(frozen=True)
class InternVisionHFSpec(InternVisionSpec):
    """The native tower's config keeps sizes as [height, width] pairs and the ratio at the top level."""

    def geometry(self, config: object) -> dict[str, int]:
        vision = config.vision_config
        return {"patch_size": vision.patch_size[0], "merge_size": round(1 / config.downsample_ratio),
                "channels": vision.num_channels}

    def size(self, config: object) -> tuple[int, int]:
        height, width = config.vision_config.image_size
        return height, width

    def build(self, model: object, grid: tuple[int, int]) -> object:
        from surgery.export.internvl_vision import InternVisionHFGraph

        return InternVisionHFGraph(model, grid)

    def needs(self) -> tuple[str, ...]:
        return (self.path, "model.multi_modal_projector")

    def record(self, model_dir: Path, config: object, raw_config: dict, spec: object, size: tuple[int, int],
               seq: int) -> dict:
        path = Path(model_dir) / PREPROCESSOR
        if not path.is_file():
            raise SurgeryError(f"{model_dir} has no {PREPROCESSOR}, so the image preprocessing is unknown; copy the "
                               "original model's file next to config.json and re-run apply")
        pre = json.loads(path.read_text())
        record = super().record(model_dir, config, raw_config, spec, size, seq)
        ids = token_ids(model_dir, {"vision_start_token_id": "<img>", "vision_end_token_id": "</img>"})
        return record | ids | {
            "image_token_id": raw_config["image_token_id"],
            "resample": RESAMPLE.get(pre.get("resample", 3), "bicubic"),
            "rescale_factor": pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0,
            "image_mean": pre.get("image_mean"), "image_std": pre.get("image_std"),
            "preprocessing": f"{pre.get('image_processor_type', 'GotOcr2ImageProcessor')}: RGB, resize to "
                             "image_size, rescale, normalize",
            "tiling": {"max_num": 1, "tiles": 1, "crop_to_patches": False,
                       "rule": "crop_to_patches off: one tile of the whole image resized to image_size"},
            "downsample_ratio": raw_config.get("downsample_ratio", 0.5),
        }


INTERNVL_HF_SPEC = ArchSpec(
    embedding="model.language_model.embed_tokens",
    layers="model.language_model.layers",
    final_norm="model.language_model.norm",
    lm_head="lm_head",
    rope_tables=qwen2_vl_rope,  # the same place: model.model.language_model.rotary_emb, 1-D positions here
    call_block=native_block,
    num_kv_heads=lambda c: c.num_key_value_heads,
    head_dim=lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    # checkpoints written before transformers 4.52's refactor keep the older names
    checkpoint_prefixes=(("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("lm_head.", "language_model.lm_head.")),
    vision=InternVisionHFSpec(path="model.vision_tower", config="vision_config", default_size=(448, 448),
                              wrapper="InternVisionHFGraph"),
)
