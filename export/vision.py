"""The vision tower as one static graph: a fixed image size gives a fixed patch count, so everything the
tower derives from the image grid (its 2-D rotary angles, the attention's sequence split) is a constant.

Qwen2-VL's tower takes patches flattened the way its processor lays them out ([N, C*T*P*P], merge windows
contiguous) and returns one embedding per 2x2 merge window ([N / merge^2, text hidden]): what the runtime
writes into the prompt's image-token rows. Patchify stays on the host (numpy reshapes of any rank); the graph
holds only the conv, the blocks and the merger, which every NPU compiler takes.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index


class Qwen2VisionGraph(torch.nn.Module):
    """pixel_values [N, C*T*P*P] (normalized, patchified) -> image_embeds [N / merge^2, hidden]."""

    def __init__(self, visual: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
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


class Qwen25VisionGraph(torch.nn.Module):
    """Qwen2.5-VL's tower: as Qwen2-VL's, plus window attention. The merge windows are reordered window by
    window (a constant gather), blocks outside `fullatt_block_indexes` attend within each window (the constant
    window boundaries split the attention), and the merger's output is put back in raster order."""

    def __init__(self, visual: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.visual = visual
        grid_thw = torch.tensor([[1, grid[0], grid[1]]])
        n = grid[0] * grid[1]
        positions = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        order, windows = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                 window_size=visual.window_size, patch_size=visual.patch_size)
        cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("restore", torch.argsort(order), persistent=False)
        self.register_buffer("cos", self._windowed(cos.detach().clone(), n), persistent=False)
        self.register_buffer("sin", self._windowed(sin.detach().clone(), n), persistent=False)
        self.register_buffer("full", torch.tensor([0, n], dtype=torch.int32), persistent=False)
        self.register_buffer("windows", windows, persistent=False)

    def _windowed(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        unit = self.visual.spatial_merge_unit
        return rows.reshape(n // unit, unit, -1)[self.order].reshape(n, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.visual.patch_embed(pixel_values)
        hidden = self._windowed(hidden, hidden.shape[0])
        for i, block in enumerate(self.visual.blocks):
            bounds = self.full if i in self.visual.fullatt_block_indexes else self.windows
            hidden = block(hidden, cu_seqlens=bounds, position_embeddings=(self.cos, self.sin))
        return self.visual.merger(hidden)[self.restore]
