"""The vision tower as one static graph: a fixed image size gives a fixed patch count, so everything the
tower derives from the image grid (its 2-D rotary angles, the attention's sequence split) is a constant.

Qwen2-VL's tower takes patches flattened the way its processor lays them out ([N, C*T*P*P], merge windows
contiguous) and returns one embedding per 2x2 merge window ([N / merge^2, text hidden]): what the runtime
writes into the prompt's image-token rows. Patchify stays on the host (numpy reshapes of any rank); the graph
holds only the conv, the blocks and the merger, which every NPU compiler takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSpec:
    """Where a VL model keeps its tower and how its processor cuts an image into the tower's input."""

    path: str  # the tower module, e.g. "model.visual"
    config: str  # attribute of the model config holding the vision config
    default_size: tuple[int, int]  # image size (height, width) when export is not told one

    def geometry(self, config: object) -> dict[str, int]:
        vision = getattr(config, self.config)
        return {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "merge_size": vision.spatial_merge_size, "channels": vision.in_channels}


def patch_grid(spec: VisionSpec, config: object, size: tuple[int, int]) -> tuple[int, int]:
    """(grid_h, grid_w) in patches for an image of `size`; a size the merge windows do not tile is refused."""
    from surgery.errors import SurgeryError

    geo = spec.geometry(config)
    step = geo["patch_size"] * geo["merge_size"]
    if any(s <= 0 or s % step for s in size):
        raise SurgeryError(f"--image-size {size[0]}x{size[1]}: both sides must be positive multiples of {step} "
                           f"(patch {geo['patch_size']} x merge {geo['merge_size']})")
    return size[0] // geo["patch_size"], size[1] // geo["patch_size"]


class Qwen2VisionGraph(torch.nn.Module):
    """pixel_values [N, C*T*P*P] (normalized, patchified) -> image_embeds [N / merge^2, hidden]."""

    def __init__(self, visual: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids

        self.visual = visual
        grid_thw = torch.tensor([[1, grid[0], grid[1]]])
        positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = visual.rotary_pos_emb(probe, positions)
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)
        self.register_buffer("cu_seqlens", torch.tensor([0, grid[0] * grid[1]], dtype=torch.int32),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.visual.patch_embed(pixel_values)
        for block in self.visual.blocks:
            hidden = block(hidden, cu_seqlens=self.cu_seqlens, position_embeddings=(self.cos, self.sin))
        return self.visual.merger(hidden)
