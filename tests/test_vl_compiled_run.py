"""VL bundles, with the exported fixtures built once for all of them:

- `surgery run <compiled bundle> --image`: a bm1684x bundle (its compiled `vision` net and the LLM's nets on
  TPU-MLIR's CPU simulator, driven as LLM-TPU's runtime drives them) and MNN's per-graph layout generate the ONNX
  reference's greedy tokens on the same image, for Qwen2-VL (multimodal RoPE) and InternVL (1-D positions): one
  host path, keyed by manifest.vision;
- MNN's engine layout refuses VL models with the engine's reason;
- the Axera kit builds the vision graph with a calibration set made from images;
- the report has a vision section."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_compile_axera import fake_pulsar2  # noqa: F401  (fixture: the stand-in pulsar2 on PATH)
from test_pack_qwen2_vl import _image, vl  # noqa: F401  (module fixture: the exported tiny Qwen2-VL)
from test_qwen2_vl_run import _cli

from surgery.compile.axera import ADAPTER as AXERA
from surgery.compile.axera import AxeraOptions
from surgery.compile.axera_vision import synthetic_images
from surgery.compile.base import CompileOptions
from surgery.compile.toolchains import installed
from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.onnxio import run_once
from surgery.report import write_report
from surgery.report_vision import vision_markdown
from surgery.runtime import OnnxModel, load_tokenizer
from surgery.vision_input import image_prompt, load_image, prepare, preprocess

NEW, QUESTION = 16, "Describe the dog"


@pytest.fixture(scope="module")
def reference(vl):  # noqa: F811
    """The photo (at the exported size, so no resampling filter is involved), the ONNX runtime's greedy tokens
    for it, and the smallest top-1/top-2 logit gap along the way: a compiled float16 model can only be held
    to exact tokens where no step is a near tie."""
    photo = vl["root"] / "photo-56x84.png"
    _image(15, (56, 84)).save(photo)  # no near tie in 24 steps (smallest gap 0.07)
    model = OnnxModel(vl["onnx"])
    vision = model.manifest.vision
    ids = image_prompt(load_tokenizer(vl["onnx"]), QUESTION, chat=True, vision=vision)
    gaps, pick = [], model._next

    def next_token(hidden_row, seen, sampling, rng):
        top = np.sort(model.run("lm_head", hidden_states=hidden_row)[0].reshape(-1))[-2:]
        gaps.append(float(top[1] - top[0]))
        return pick(hidden_row, seen, sampling, rng)

    model._next = next_token
    tokens = model.generate(ids, NEW, media=prepare(model.run, ids, load_image(photo), vision)).tokens
    assert len(set(tokens)) >= 8, "fixture too degenerate for a token test"
    return {"photo": photo, "ids": ids, "tokens": tokens, "min_gap": min(gaps)}


def _run_image(monkeypatch, capsys, bundle, photo) -> dict:
    code, out, err = _cli(monkeypatch, capsys, "run", bundle, "--image", photo, "--prompt", QUESTION, "--chat",
                          "--max-new-tokens", NEW, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                    "`surgery toolchain install sophgo` (make toolchains)")
def test_bm1684x_bundle_runs_an_image_like_the_onnx_reference(vl, reference, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
    from surgery.compile.sophgo import ADAPTER as SOPHGO
    from surgery.compile.sophgo_runtime import SophgoModel

    assert reference["min_gap"] > 0.05, "the reference has a near tie F16 could flip: pick another question"
    SOPHGO.compile(vl["onnx"], tmp_path / "bm", CompileOptions("bm1684x", quantize="f16", check="none"))
    got = _run_image(monkeypatch, capsys, tmp_path / "bm", reference["photo"])
    assert got["backend"] == "bmodel" and got["prompt_tokens"] == len(reference["ids"])
    assert got["tokens"] == reference["tokens"]
    with pytest.raises(SurgeryError, match="whole generations"):  # only the tower runs as a net of its own
        SophgoModel(tmp_path / "bm").run("block_0")


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_mnn_graphs_bundle_runs_an_image_like_the_onnx_reference(vl, reference, tmp_path, monkeypatch,  # noqa: F811
                                                                  capsys):
    from surgery.compile.mnn import ADAPTER as MNN

    MNN.compile(vl["onnx"], tmp_path / "mnn", CompileOptions("mnn", quantize="fp32", layout="graphs", check="none"))
    got = _run_image(monkeypatch, capsys, tmp_path / "mnn", reference["photo"])
    assert got["backend"] == "mnn" and got["tokens"] == reference["tokens"]


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_mnn_engine_layout_refuses_qwen2_vl_with_the_engines_reason(vl, tmp_path, monkeypatch, capsys):  # noqa: F811
    """MNN 3.6.1's engine runs Qwen2-VL image prompts with decode positions that lack the mrope delta
    (compile/mnn.py vision_refusal): one line, before any work, pointing at the per-graph layout."""
    code, _, err = _cli(monkeypatch, capsys, "compile", vl["onnx"], "--chip", "mnn", "-q", "fp32", "-o",
                        tmp_path / "engine")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "multimodal-RoPE delta" in err and "--layout graphs" in err
    assert not (tmp_path / "engine" / "llm.mnn").exists()


@pytest.fixture(scope="module")
def ivl(tmp_path_factory) -> dict:
    """The tiny InternVL fixture exported at SEQ 128 (test_pack_internvl's, without its reference model)."""
    from surgery.apply import plan_apply, write_plan
    from surgery.export.exporter import ExportOptions, export_model
    from surgery.fixtures.internvl import build
    from surgery.packs import ApplyOptions, get_pack

    root = tmp_path_factory.mktemp("internvl-compiled")
    write_plan(plan_apply(get_pack("internvl"), build(root / "src"), ApplyOptions(seq_length=128, dtype="fp32")),
               root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=128, trust_remote_code=True))
    _image(7, (150, 120)).save(root / "photo.png")  # the preprocessing resizes it to the 112-pixel tile
    return {"onnx": root / "onnx", "photo": root / "photo.png"}


def test_mnn_361_engine_position_rule_changes_the_tokens(vl, reference):  # noqa: F811
    """The refusal's reason on the fixture itself: fed decode positions as MNN 3.6.1's engine feeds them (slot p
    in all three rows, no image delta), the same graphs leave the model's tokens at the second step."""
    from dataclasses import replace

    model = OnnxModel(vl["onnx"])
    vision = model.manifest.vision
    media = prepare(model.run, reference["ids"], load_image(reference["photo"]), vision)
    assert media.delta == max(2, 3) - 2 * 3 == -3  # a 2 x 3 merged grid: 6 tokens spanning 3 positions
    engine = model.generate(reference["ids"], NEW, media=replace(media, delta=0)).tokens
    assert engine[0] == reference["tokens"][0]  # the prefill's positions agree (columns >= rows here)
    assert engine[1:] != reference["tokens"][1:]


def _internvl_case(ivl, tmp_path, adapter, options: CompileOptions,
                   bundle: str) -> tuple[list[int], list[int]]:
    """InternVL (1-D positions, NCHW tile) through a compiled bundle: the same host path, no mrope."""
    reference = OnnxModel(ivl["onnx"])
    vision = reference.manifest.vision
    ids = image_prompt(load_tokenizer(ivl["onnx"]), QUESTION, chat=False, vision=vision)
    image = load_image(ivl["photo"])
    want = reference.generate(ids, NEW, media=prepare(reference.run, ids, image, vision)).tokens
    adapter.compile(ivl["onnx"], tmp_path / bundle, options)
    from surgery.runtime import open_runtime

    model = open_runtime(tmp_path / bundle)
    return model.generate(ids, NEW, media=prepare(model.run, ids, image, vision)).tokens, want


@pytest.mark.skipif(installed("mnn") is None, reason="MNN toolchain absent: run `surgery toolchain install mnn`")
def test_internvl_mnn_graphs_bundle_runs_an_image(ivl, tmp_path):
    from surgery.compile.mnn import ADAPTER as MNN

    got, want = _internvl_case(ivl, tmp_path, MNN, CompileOptions("mnn", quantize="fp32", layout="graphs",
                                                                  check="none"), "mnn")
    assert len(set(want)) >= 6 and got == want


@pytest.mark.slow
@pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                    "`surgery toolchain install sophgo` (make toolchains)")
def test_internvl_bm1684x_bundle_runs_an_image(ivl, tmp_path):
    """About 4 min on 2 busy cores with a cold compile cache, 30 s warm (SEQ 128 on the simulator); 16 of 16."""
    from surgery.compile.sophgo import ADAPTER as SOPHGO

    got, want = _internvl_case(ivl, tmp_path, SOPHGO, CompileOptions("bm1684x", quantize="f16", check="none"), "bm")
    assert got == want



def _samples(path: Path) -> list[np.ndarray]:
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]


def test_axera_kit_vision_config_and_calibration(vl, tmp_path, monkeypatch, fake_pulsar2):  # noqa: F811
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


def test_axera_synthesized_calibration_images_vary_and_are_seeded(vl, tmp_path):  # noqa: F811
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



def test_vl_report_has_a_vision_section(vl, tmp_path):  # noqa: F811
    out = tmp_path / "bundle"
    shutil.copytree(vl["onnx"], out / "stages" / "export")  # what convert's export stage leaves
    results = {"export": {"parity": [{"graph": "vision", "output": "image_embeds", "cosine": 0.9999991},
                                     {"graph": "block_0", "output": "hidden_states", "cosine": 0.9999999}]},
               "optimize": {"graphs": {"vision": {"cosine": 0.9999987}}},
               "compile": {"parity": [{"graph": "vision", "output": "image_embeds", "cosine": 0.9999996}]}}
    options = SimpleNamespace(chip="bm1684x", quantize="f16", check="sample")
    write_report(out, results, {"export": 1.0}, options)
    md = (out / "report.md").read_text()
    section = md.split("## Vision")[1].split("## Sizes")[0]
    assert "| image size (height x width) | 56 x 84, fixed in the graph" in section and "bicubic" in section
    assert "pixel_values [24, 1176] float32" in section and "6 embeddings per image" in section
    assert "multimodal RoPE [3, 1, S], sections [2, 3, 3]" in section and "[1, 4, 6]" in section
    assert ("torch -> ONNX 0.9999991, ONNX -> optimized 0.9999987, optimized -> compiled 0.9999996" in section)
    assert "surgery run bundle --image photo.png" in section
    page = (out / "report.html").read_text()
    HTMLParser().feed(page)
    assert "<h2>Vision</h2>" in page and "0.9999996" in page.split("<h2>Vision</h2>")[1]
    options.chip = "ax650"  # a kit: nothing runs it here, so no `surgery run` line
    write_report(out, results, {"export": 1.0}, options)
    assert "## Vision" in (out / "report.md").read_text() and "--image" not in (out / "report.md").read_text()
    text_only = replace(Manifest.read(vl["onnx"]), vision=None)
    assert vision_markdown(text_only, {}, [], "bundle") == []
