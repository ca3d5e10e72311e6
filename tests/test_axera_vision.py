"""The Axera kit of a VL export: the vision graph's Pulsar2 build config (AXERA-TECH's ViT settings) and a
calibration set of preprocessed pixel values from images, checked against the manifest, by the stand-in
`pulsar2` (which validates every config field and calibration shape) and against the reference runtime's own
preprocessing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from test_compile_axera import fake_pulsar2  # noqa: F401  (fixture: the stand-in pulsar2 on PATH)
from test_pack_qwen2_vl import _image, vl  # noqa: F401  (module fixture: the exported tiny Qwen2-VL)

from surgery.compile.axera import ADAPTER as AXERA
from surgery.compile.axera import AxeraOptions
from surgery.compile.axera_vision import synthetic_images
from surgery.compile.base import CompileOptions
from surgery.manifest import Manifest
from surgery.onnxio import run_once
from surgery.vision_input import load_image, preprocess


def _samples(path: Path) -> list[np.ndarray]:
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]


def test_vision_graph_config_and_calibration(vl, tmp_path, monkeypatch, fake_pulsar2):  # noqa: F811
    monkeypatch.setenv("PATH", f"{fake_pulsar2}:/usr/bin:/bin")
    photos = []
    for seed, size in ((3, (60, 90)), (4, (56, 84))):  # one the preprocessing resizes, one it does not
        photos.append(str(tmp_path / f"photo{seed}.png"))
        _image(seed, size).save(photos[-1])
    kit = AXERA.compile(vl["onnx"], tmp_path / "kit", CompileOptions("ax650"),
                        calibration=AxeraOptions(calibration_images=tuple(photos), calibration_prompts=2))
    out, manifest = tmp_path / "kit", Manifest.read(vl["onnx"])
    graph, vision = manifest.graph("vision"), manifest.vision
    assert kit.compiled.details["built"] is True  # the stand-in accepted every config and calibration set
    entry = next(g for g in kit.compiled.details["graphs"] if g["graph"] == "vision")
    assert entry["name"] == "qwen2_vl_vision" and entry["calibration"]["images"] == photos
    config = json.loads((out / "configs" / "qwen2_vl_vision.json").read_text())
    assert (config["input"], config["target_hardware"], config["npu_mode"]) == \
        ("onnx/qwen2_vl_vision.onnx", "AX650", "NPU3")
    quant = config["quant"]
    assert quant["input_configs"] == [{"tensor_name": "pixel_values", "calibration_format": "Numpy",
                                       "calibration_dataset": "calib/qwen2_vl_vision.pixel_values.tar",
                                       "calibration_size": 2}]
    assert quant["layer_configs"][0]["data_type"] == "U16" and quant["precision_analysis_method"] == "EndToEnd"
    assert config["input_processors"] == [{"tensor_name": "pixel_values", "src_dtype": "FP32"}]
    samples = _samples(out / "calib" / "qwen2_vl_vision.pixel_values.tar")
    assert [list(s.shape) for s in samples] == [graph.inputs[0].shape] * 2 == [[24, 1176]] * 2
    assert all(s.dtype == np.float32 for s in samples)
    for sample, photo in zip(samples, photos, strict=True):  # exactly what `run --image` feeds the tower
        assert np.array_equal(sample, preprocess(load_image(photo), vision))
    # the kit's tower computes what the export's does, and the build script builds it with the others
    want = run_once(vl["onnx"] / "vision.onnx", {"pixel_values": samples[0]})[0]
    got = run_once(out / "onnx" / "qwen2_vl_vision.onnx", {"pixel_values": samples[0]})[0]
    assert np.array_equal(got, want)
    assert "--config configs/qwen2_vl_vision.json" in (out / "build.sh").read_text()
    # the layers' calibration keeps the three position rows of multimodal RoPE
    prefill = next(g for g in kit.compiled.details["graphs"] if g["graph"] == "block_0")
    indices = _samples(out / "calib" / f"{prefill['name']}.indices.tar")
    assert indices[0].shape == (3, manifest.seq_length) and indices[0].dtype == np.uint32


def test_synthesized_calibration_images_vary_and_are_seeded(vl, tmp_path):  # noqa: F811
    """Without images the kit synthesizes them: deterministic, at other sizes than the exported one, and
    not flat (edges and texture for MinMax to see)."""
    images = synthetic_images(4, (56, 84))
    again = synthetic_images(4, (56, 84))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    assert {im.size for im in images} >= {(63, 42), (105, 70)}
    assert all(np.asarray(im).std() > 10 for im in images)
    kit = AXERA.compile(vl["onnx"], tmp_path / "kit", CompileOptions("ax650"),
                        calibration=AxeraOptions(calibration_prompts=1, vision_samples=3))
    entry = next(g for g in kit.compiled.details["graphs"] if g["graph"] == "vision")
    assert entry["calibration"]["images"] == "synthesized" and entry["samples"] == 3
    samples = _samples(tmp_path / "kit" / "calib" / "qwen2_vl_vision.pixel_values.tar")
    assert len(samples) == 3 and len({s.tobytes() for s in samples}) == 3

