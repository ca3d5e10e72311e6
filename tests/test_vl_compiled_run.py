"""`surgery run <compiled VL bundle> --image`: the bm1684x bundle (its compiled `vision` net and the LLM's nets on
TPU-MLIR's CPU simulator, driven as LLM-TPU's runtime drives them) and MNN's per-graph layout generate the same
greedy tokens as the ONNX reference runtime on the same image, for Qwen2-VL (multimodal RoPE) and InternVL
(1-D positions): one host path, keyed by manifest.vision."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_pack_qwen2_vl import _image, vl  # noqa: F401  (module fixture: the exported tiny Qwen2-VL)
from test_qwen2_vl_run import _cli

from surgery.compile.base import CompileOptions
from surgery.compile.toolchains import installed
from surgery.errors import SurgeryError
from surgery.runtime import OnnxModel, load_tokenizer
from surgery.vision_input import image_prompt, load_image, prepare

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
    """~4 min on 2 shared cores (SEQ 128 on the simulator): measured 16 of 16 tokens equal at F16."""
    from surgery.compile.sophgo import ADAPTER as SOPHGO

    got, want = _internvl_case(ivl, tmp_path, SOPHGO, CompileOptions("bm1684x", quantize="f16", check="none"), "bm")
    assert got == want
