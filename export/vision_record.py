"""What a VL export writes into its manifest, so a runtime needs nothing but the manifest and the graphs:
the image preprocessing (the model's processor settings at the exported image size, the patch layout), the
vision token ids, and the position convention that multimodal RoPE changes."""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec
from surgery.export.vision_spec import patch_grid

PREPROCESSOR = "preprocessor_config.json"
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbering
PATCH_LAYOUT = ("channels-first image [C, H, W] -> reshape [C, gh/m, m, P, gw/m, m, P] -> transpose (1, 4, 2, 5, 0, "
                "3, 6) -> repeat each patch T times after C -> [gh*gw, C*T*P*P] (Qwen2-VL processor order)")


def vision_record(model_dir: Path, config: object, raw_config: dict, spec: ArchSpec,
                  size: tuple[int, int], seq: int) -> dict:
    """manifest["vision"] for an export of `size` images; refuses a model without its processor settings or an
    image that would not fit the sequence."""
    path = Path(model_dir) / PREPROCESSOR
    if not path.is_file():
        raise SurgeryError(f"{model_dir} has no {PREPROCESSOR}, so the image preprocessing is unknown; copy the "
                           "original model's file next to config.json and re-run apply")
    pre = json.loads(path.read_text())
    grid = patch_grid(spec.vision, config, size)
    geo = spec.vision.geometry(config)
    tokens = grid[0] * grid[1] // geo["merge_size"] ** 2
    if tokens + 3 > seq:
        raise SurgeryError(f"an image of {size[0]}x{size[1]} is {tokens} tokens, which leaves no room for a prompt "
                           f"in --seq-length {seq}; export a smaller --image-size or a longer --seq-length")
    return {
        "graph": "vision", "image_size": list(size), "grid_thw": [1, *grid], "tokens": tokens,
        "resample": RESAMPLE.get(pre.get("resample", 3), "bicubic"),
        "rescale_factor": pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0,
        "image_mean": pre.get("image_mean"), "image_std": pre.get("image_std"),
        **geo, "patch_layout": PATCH_LAYOUT,
        "image_token_id": raw_config["image_token_id"], "vision_start_token_id": raw_config["vision_start_token_id"],
        "vision_end_token_id": raw_config["vision_end_token_id"],
        "prompt": "<vision_start> then `tokens` image tokens (rows replaced by image_embeds) then <vision_end>",
    }


def mrope_conventions(sections: tuple[int, ...]) -> dict:
    """The block contract's position input under multimodal RoPE."""
    return {
        "position_ids": "int32 [3, 1, S]: temporal, height, width components (multimodal RoPE)",
        "mrope": {"sections": list(sections),
                  "rule": "rotary frequency section i (sections repeated for the head's second half) is "
                          "rotated by position component i % 3",
                  "text": "a text token at index i after the last image has all three components i + delta",
                  "image": "image token (h, w) of the merged grid: [s, s + h, s + w], s the position after the "
                           "preceding text; the next text token continues at s + max(grid_h, grid_w) / merge",
                  "decode": "position p (slot) is fed as p + delta, delta = max prefill position + 1 - prompt length"},
    }
