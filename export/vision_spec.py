"""Where a VL model keeps its vision tower and how its processor cuts an image, as plain data: packs import it
when `surgery list` loads them, so it imports neither torch nor transformers (the graph modules that do are
in export/vision.py, named here by class).

The methods are what export asks of a family (the image size it defaults to, the grid an image size gives,
the graph's input shape, the wrapper module, the manifest record); Qwen2-VL's answers are the defaults, and a
family with another tower overrides them (export/internvl_spec.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VisionSpec:
    """Where a VL model keeps its tower and how its processor cuts an image into the tower's input."""

    path: str  # the tower module, e.g. "model.visual"
    config: str  # attribute of the model config holding the vision config
    default_size: tuple[int, int]  # image size (height, width) when export is not told one
    wrapper: str  # class in export/vision.py: (tower, (grid_h, grid_w)) -> the static graph module

    def geometry(self, config: object) -> dict[str, int]:
        vision = getattr(config, self.config)
        return {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "merge_size": vision.spatial_merge_size, "channels": vision.in_channels}

    def size(self, config: object) -> tuple[int, int]:
        """The image size export uses when not told one."""
        return self.default_size

    def grid(self, config: object, size: tuple[int, int]) -> tuple[int, int]:
        return patch_grid(self, config, size)

    def input_shape(self, config: object, grid: tuple[int, int]) -> tuple[int, ...]:
        """The vision graph's pixel_values shape: patchified, [gh*gw, C*T*P*P]."""
        geo = self.geometry(config)
        return grid[0] * grid[1], geo["channels"] * geo["temporal_patch_size"] * geo["patch_size"] ** 2

    def build(self, model: object, grid: tuple[int, int]) -> object:
        """The static graph module for `grid`."""
        from operator import attrgetter

        from surgery.export import vision

        return getattr(vision, self.wrapper)(attrgetter(self.path)(model), grid)

    def needs(self) -> tuple[str, ...]:
        """The modules whose weights the graph reads."""
        return (self.path,)

    def record(self, model_dir: Path, config: object, raw_config: dict, spec: object, size: tuple[int, int],
               seq: int) -> dict:
        """manifest["vision"] (export/vision_record.py)."""
        from surgery.export.vision_record import vision_record

        return vision_record(model_dir, config, raw_config, spec, size, seq)


def patch_grid(spec: VisionSpec, config: object, size: tuple[int, int]) -> tuple[int, int]:
    """(grid_h, grid_w) in patches for an image of `size`; a size the merge windows do not tile is refused."""
    from surgery.errors import SurgeryError

    geo = spec.geometry(config)
    step = geo["patch_size"] * geo["merge_size"]
    if any(s <= 0 or s % step for s in size):
        raise SurgeryError(f"--image-size {size[0]}x{size[1]}: both sides must be positive multiples of {step} "
                           f"(patch {geo['patch_size']} x merge {geo['merge_size']})")
    return size[0] // geo["patch_size"], size[1] // geo["patch_size"]
