"""Where a VL model keeps its vision tower and how its processor cuts an image, as plain data: packs import it
when `surgery list` loads them, so it imports neither torch nor transformers (the graph modules that do are
in export/vision.py, named here by class)."""

from __future__ import annotations

from dataclasses import dataclass


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


def patch_grid(spec: VisionSpec, config: object, size: tuple[int, int]) -> tuple[int, int]:
    """(grid_h, grid_w) in patches for an image of `size`; a size the merge windows do not tile is refused."""
    from surgery.errors import SurgeryError

    geo = spec.geometry(config)
    step = geo["patch_size"] * geo["merge_size"]
    if any(s <= 0 or s % step for s in size):
        raise SurgeryError(f"--image-size {size[0]}x{size[1]}: both sides must be positive multiples of {step} "
                           f"(patch {geo['patch_size']} x merge {geo['merge_size']})")
    return size[0] // geo["patch_size"], size[1] // geo["patch_size"]
