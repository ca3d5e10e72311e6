"""A VL model's vision graph in the Axera kit: the graph itself, its `pulsar2 build` config and a calibration set
made from images.

The config follows the ViT builds of AXERA-TECH's own VL ports (`model_convert/config.json` of
Qwen2.5-VL-3B-Instruct.axera and `model_convert/pulsar2_configs/config.json` of InternVL3_5-2B.axera): U16
activations everywhere (`layer_configs` DEFAULT), MinMax calibration, smooth quant, FP32 convolution bias, no
automatic scale refinement, and an end-to-end precision analysis, so the build reports how far the quantized
tower drifts. Their calibration sets are images ("Image" format, normalized by `calibration_mean`/`std`)
because their towers take the image itself; our tower takes the processor's output (Qwen2-VL: patchified
[patches, C*T*P*P]; InternVL: NCHW), so the kit stores that output, computed from the images by the same
preprocessing `surgery run --image` uses (surgery/vision_input.py), as a "Numpy" set: one float32 .npy per
image in a tar, each exactly the graph input's shape.

Where the user gives no images the kit synthesizes them (seeded): smooth colour fields with shapes and
noise, at other sizes than the exported one so the resize runs as it will on real photos. The kit's
manifest says which it used; real images of the target domain calibrate better.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json
from surgery.manifest import GraphSpec, Manifest
from surgery.onnxio import data_file, load_structure, rename_locations, save_graph
from surgery.vision_input import load_image, preprocess


def synthetic_images(count: int, size: tuple[int, int], seed: int = 0) -> list:
    """`count` RGB images around `size` (height, width): a colour gradient, a few filled rectangles and
    ellipses, and mild noise, so the calibration sees edges, flat areas and texture rather than noise only."""
    from PIL import Image, ImageDraw

    rng, images = np.random.default_rng(seed), []
    for i in range(count):
        scale = 0.75 + 0.5 * (i % 4) / 3  # 0.75x .. 1.25x the exported size
        h, w = max(8, int(size[0] * scale)), max(8, int(size[1] * scale))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        start, slope = rng.uniform(0, 255, 3), rng.uniform(-200, 200, (2, 3))
        field = start + yy[..., None] * slope[0] + xx[..., None] * slope[1]
        image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            box = [x0, y0, int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (h, w, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


def calibration_pixels(vision: dict, graph: GraphSpec, paths: tuple[str, ...], count: int) -> list[np.ndarray]:
    """The tower's input for each image (the user's `paths`, else `count` synthesized ones), float32 in the
    graph input's exact shape."""
    images = [load_image(p) for p in paths] or synthetic_images(count, tuple(vision["image_size"]))
    shape = graph.inputs[0].shape
    samples = [preprocess(image, vision) for image in images]
    for sample in samples:
        if list(sample.shape) != list(shape):
            raise SurgeryError(f"the vision preprocessing gives {list(sample.shape)} but graph {graph.name} takes "
                               f"{shape}; re-export the model")
    return samples


def kit_vision_graph(onnx_dir: Path, graph: GraphSpec, dst: Path) -> None:
    """The tower as exported (its I/O is no runtime contract of ax-llm's), with its own copy of its weights."""
    model = load_structure(onnx_dir / graph.file)
    if graph.data_file:
        shutil.copyfile(onnx_dir / graph.data_file, data_file(dst))
        rename_locations(model, {graph.data_file: data_file(dst).name})
    save_graph(model, dst)


def vision_build_config(name: str, graph: GraphSpec, hardware: str, npu_mode: str, calib: str, samples: int) -> dict:
    """The layers' build config (compile/axera.py) with what AXERA-TECH's ViT builds add: smooth quant, FP32
    conv bias, end-to-end precision analysis. The host feeds the preprocessed float tensor itself: no colour
    conversion or normalization on the NPU."""
    from surgery.compile.axera import build_config

    config = build_config(name, hardware, npu_mode, {graph.inputs[0].name: calib}, samples)
    config["quant"].update({"precision_analysis": True, "precision_analysis_method": "EndToEnd",
                            "conv_bias_data_type": "FP32", "enable_smooth_quant": True,
                            "disable_auto_refine_scale": True})
    return config


def vision_kit(onnx_dir: Path, out: Path, manifest: Manifest, hardware: str, npu_mode: str,
               images: tuple[str, ...], count: int, write_calibration) -> tuple[list[str], dict]:
    """Write the tower's graph, calibration tar and config into the kit; the `pulsar2 build` command and the
    kit manifest's entry for it."""
    graph, vision = manifest.graph(manifest.vision["graph"]), manifest.vision
    name = f"{manifest.model_type}_vision"
    kit_vision_graph(onnx_dir, graph, out / "onnx" / f"{name}.onnx")
    samples = calibration_pixels(vision, graph, images, count)
    calib = f"calib/{name}.{graph.inputs[0].name}.tar"
    write_calibration(out / calib, samples)
    config = vision_build_config(name, graph, hardware, npu_mode, calib, len(samples))
    atomic_write_json(out / "configs" / f"{name}.json", config)
    command = ["pulsar2", "build", "--input", config["input"], "--output_dir", config["output_dir"], "--config",
               f"configs/{name}.json", "--target_hardware", hardware]
    entry = {"graph": graph.name, "name": name, "samples": len(samples), "inputs": [t.name for t in graph.inputs],
             "outputs": [t.name for t in graph.outputs],
             "calibration": {"images": list(images) or "synthesized", "image_size": vision["image_size"],
                             "layout": list(graph.inputs[0].shape), "dtype": "float32"}}
    return command, entry
