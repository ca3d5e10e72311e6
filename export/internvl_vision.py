"""InternVL's vision path as one static graph: InternViT on one square tile, the class token dropped, the
chat model's own pixel shuffle (downsample ratio 0.5: 2x2 patches -> one token of 4x the width) and its
`mlp1` projector (LayerNorm, Linear, GELU, Linear) into the language model's hidden size.

At the checkpoint's own image size the position table is used as stored: upstream resizes it with a bicubic
interpolation to the same size, an exact identity, which would otherwise put a Resize into the graph that NPU
compilers handle poorly. Another --image-size keeps the model's own interpolation.
"""

from __future__ import annotations

import torch


class InternVisionGraph(torch.nn.Module):
    """pixel_values [1, 3, S, S] (normalized) -> image_embeds [(S/14)^2 / 4, LLM hidden]."""

    def __init__(self, model: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.tower, self.mlp1, self.grid = model.vision_model, model.mlp1, grid
        self.shuffle = model.pixel_shuffle  # the chat model's method: v1/v2 layouts as the checkpoint says
        self.ratio = model.downsample_ratio
        layers = len(self.tower.encoder.layers)
        # select_layer -1: the last layer's output; k >= 0 or -k: hidden_states[k] of [embeddings, layer 1..N]
        self.depth = model.select_layer % (layers + 1)
        embeddings = self.tower.embeddings
        side = embeddings.image_size // embeddings.patch_size
        self.native = tuple(grid) == (side, side)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        dtype = embeddings.patch_embedding.weight.dtype
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = torch.cat([embeddings.class_embedding.to(dtype), patches], dim=1)
        table = embeddings.position_embedding
        if not self.native:
            table = torch.cat([table[:, :1], embeddings._get_pos_embed(table[:, 1:], *self.grid)], dim=1)
        hidden = hidden + table.to(dtype)
        for layer in self.tower.encoder.layers[:self.depth]:
            hidden = layer(hidden)
        hidden = hidden[:, 1:].reshape(1, self.grid[0], self.grid[1], -1)
        hidden = self.shuffle(hidden, scale_factor=self.ratio)
        return self.mlp1(hidden.reshape(1, -1, hidden.shape[-1]))[0]


class InternVisionHFGraph(torch.nn.Module):
    """transformers' native InternVL (`InternVLForConditionalGeneration`, the `-hf` checkpoints): the same path
    under its own names (vision_tower, lambda_1/2 layer scales, multi_modal_projector). Its embeddings always
    interpolate the position table while tracing; at the checkpoint's size the table is used as stored."""

    def __init__(self, model: torch.nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        inner, config = model.model, model.config
        self.tower, self.projector, self.grid = inner.vision_tower, inner.multi_modal_projector, grid
        self.shuffle, self.ratio = inner.pixel_shuffle, config.downsample_ratio
        layers = len(self.tower.encoder.layer)
        self.depth = config.vision_feature_layer % (layers + 1)
        self.last = config.vision_feature_layer == -1  # only the last layer's output goes through `layernorm`
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.native = tuple(grid) == tuple(self.tower.embeddings.patch_embeddings.patch_shape)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.tower.embeddings
        patches = embeddings.patch_embeddings(pixel_values)
        hidden = torch.cat([embeddings.cls_token.to(patches.dtype), patches], dim=1)
        table = embeddings.position_embeddings if self.native else embeddings.interpolate_pos_encoding(
            hidden, pixel_values.shape[2], pixel_values.shape[3])
        hidden = hidden + table.to(hidden.dtype)
        for layer in self.tower.encoder.layer[:self.depth]:
            hidden = layer(hidden)
        if self.last:
            hidden = self.tower.layernorm(hidden)
        if self.drop_cls:
            hidden = hidden[:, 1:]
        hidden = self.shuffle(hidden.reshape(1, self.grid[0], self.grid[1], -1), scale_factor=self.ratio)
        return self.projector(hidden.reshape(1, -1, hidden.shape[-1]))[0]
