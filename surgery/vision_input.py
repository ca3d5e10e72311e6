"""The host side of a VL export: an image file -> the `vision` graph's input, the prompt with its image tokens,
and the multimodal-RoPE positions, all from manifest["vision"] (export/vision_record.py), so a runtime needs
no processor, config or transformers.

Preprocessing follows the model's processor (resize with its filter to the exported size, rescale, normalize,
patchify in its order); tests/test_qwen2_vl_run.py checks it against transformers' processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

FILTERS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL's Resampling numbering


@dataclass(frozen=True)
class Media:
    """What the prefill needs besides token ids: image embeddings for the image-token rows and the positions."""

    embeds: np.ndarray  # [tokens, hidden]
    slots: np.ndarray  # prompt indices of the image tokens
    positions: np.ndarray | None  # int32 [3, n]: temporal, height, width per prompt token; None: 1-D (InternVL)
    delta: int  # decode position p is fed as p + delta


def load_image(path: str | Path):
    """The image at `path` as RGB, or one line saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise SurgeryError(f"--image {path}: cannot read it as an image ({type(exc).__name__}); give a PNG or "
                           "JPEG file") from None


def preprocess(image, vision: dict) -> np.ndarray:
    """RGB image -> pixel_values [gh*gw, C*T*P*P] float32, the processor's layout at the exported size."""
    from PIL import Image

    height, width = vision["image_size"]
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling(FILTERS.index(vision["resample"])))
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(vision["rescale_factor"])
    mean = np.asarray(vision["image_mean"], np.float32)[:, None, None]
    std = np.asarray(vision["image_std"], np.float32)[:, None, None]
    pixels = (pixels - mean) / std
    if vision.get("pixel_layout") == "NCHW":  # the image itself (InternVL), not patches
        return np.ascontiguousarray(pixels[None], dtype=np.float32)
    p, m, t = vision["patch_size"], vision["merge_size"], vision["temporal_patch_size"]
    c, gh, gw = pixels.shape[0], height // p, width // p
    patches = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def expand_image_tokens(ids: list[int], vision: dict) -> list[int]:
    """The prompt with its one image token repeated once per image embedding (what the processor does)."""
    pad = vision["image_token_id"]
    if ids.count(pad) != 1:
        raise SurgeryError(f"the prompt holds {ids.count(pad)} image tokens; `run --image` places exactly one image "
                           "(leave the image token out of --prompt)")
    at = ids.index(pad)
    return ids[:at] + [pad] * vision["tokens"] + ids[at + 1:]


def image_prompt(tokenizer, text: str, chat: bool, vision: dict) -> list[int]:
    """Prompt ids for one image followed by `text`, with the vision start/end tokens around the image tokens
    (the order Qwen2-VL's chat template gives an image then a question)."""
    from surgery.runtime import encode_prompt

    names = [tokenizer.convert_ids_to_tokens(vision[k]) for k in
             ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
    text = "".join(names) + vision.get("text_after_image", "") + text  # InternVL: a newline
    # InternVL: chat() puts its conversation template's system message first (None: the chat template's default)
    return expand_image_tokens(encode_prompt(tokenizer, text, chat, vision.get("system_message")), vision)


def mrope_positions(ids: list[int], vision: dict) -> tuple[np.ndarray, int]:
    """[3, n] positions for a prompt with one image run, and the decode delta: text tokens count up in all
    three components; the image's merged grid takes (s, s + row, s + column); text after it resumes at
    s + max(rows, columns)."""
    pad, (_, gh, gw), m = vision["image_token_id"], vision["grid_thw"], vision["merge_size"]
    rows, cols = gh // m, gw // m
    out, pos, i = [], 0, 0
    while i < len(ids):
        if ids[i] == pad:
            r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
            out.append(np.stack([np.full(rows * cols, pos), pos + r.ravel(), pos + c.ravel()]))
            pos, i = pos + max(rows, cols), i + rows * cols
        else:
            out.append(np.full((3, 1), pos))
            pos, i = pos + 1, i + 1
    positions = np.concatenate(out, axis=1).astype(np.int32)
    return positions, int(positions.max()) + 1 - len(ids)


def prepare(run, ids: list[int], image, vision: dict, dtype: str = "float32") -> Media:
    """Run the vision graph on `image` (through `run(name, **feeds)`, pixels in the graph's `dtype`) and place it
    in the prompt `ids`."""
    embeds = run(vision["graph"], pixel_values=preprocess(image, vision).astype(dtype))[0]
    slots = np.flatnonzero(np.asarray(ids) == vision["image_token_id"])
    if len(slots) != len(embeds):
        raise SurgeryError(f"the prompt has {len(slots)} image tokens but the image gives {len(embeds)} embeddings; "
                           f"build it with one image token per embedding ({vision['tokens']})")
    positions, delta = (None, 0) if vision.get("positions") == "1-D" else mrope_positions(ids, vision)
    return Media(embeds, slots, positions, delta)


def image_request(model, image_path: str | Path, tokenizer, text: str | None, chat: bool,
                  tokens: list[int]) -> tuple[list[int], Media]:
    """`surgery run --image`: the prompt ids with the image placed (before `text`, or at the one image token
    of --prompt-ids) and the Media the runtime's prefill takes."""
    vision = model.manifest.vision
    if vision is None:
        raise SurgeryError(f"{model.dir} is not a vision-language export (its manifest has no vision graph); "
                           "drop --image")
    if not callable(getattr(model, "run", None)):  # a runtime that cannot run the vision graph by itself
        raise SurgeryError(f"--image: {model.dir} holds {model.manifest.backend} models in a layout whose runtime "
                           "takes no image embeddings; run the export directory instead")
    image = load_image(image_path)
    ids = image_prompt(tokenizer, text, chat, vision) if text is not None else expand_image_tokens(tokens, vision)
    if len(ids) >= model.manifest.seq_length:
        raise SurgeryError(f"the prompt with its image is {len(ids)} tokens; this export takes at most "
                           f"{model.manifest.seq_length - 1} (re-export with a larger --seq-length)")
    dtype = next((g.inputs[0].dtype for g in model.manifest.graphs if g.name == vision["graph"]), "float32")
    return ids, prepare(model.run, ids, image, vision, dtype)  # an fp16 export's vision graph takes fp16 pixels
