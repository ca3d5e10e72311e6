"""Qwen2.5-VL on a tiny random-weight fixture: the windowed vision tower as one static graph equals
transformers' tower, and `run --image` is token-identical to generate() with the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_pack_qwen2_vl import SEQ, SIZE, _image

from surgery.apply import plan_apply, write_plan
from surgery.export.exporter import ExportOptions, export_model
from surgery.onnxio import run_once
from surgery.packs import ApplyOptions, get_pack
from surgery.runtime import OnnxModel, load_tokenizer
from surgery.vision_input import image_prompt, prepare

NEW = 24


@pytest.fixture(scope="module")
def vl25(tmp_path_factory) -> dict[str, Path]:
    from surgery.fixtures.qwen2_vl import build_qwen2_vl

    root = tmp_path_factory.mktemp("qwen25vl")
    src = build_qwen2_vl(root / "src", family="qwen2_5_vl")
    write_plan(plan_apply(get_pack("qwen2_5_vl"), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                                image_size=SIZE))
    return {"src": src, "onnx": root / "onnx", "root": root}


@pytest.fixture(scope="module")
def original(vl25):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(vl25["src"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(vl25):
    """transformers' processor with the PIL image processor and no video processor (that one needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(vl25["src"]),
                                   tokenizer=load_tokenizer(vl25["onnx"]))


def test_windowed_vision_graph_matches_the_model_tower(vl25, original, processor):
    from transformers.vision_utils import get_vision_window_index

    batch = processor.image_processor(images=[_image(1, SIZE)], return_tensors="pt")
    visual = original.model.visual
    _, windows = get_vision_window_index(batch["image_grid_thw"], visual.spatial_merge_size, visual.window_size,
                                         visual.patch_size)
    sizes = (windows[1:] - windows[:-1]).tolist()
    assert len(sizes) == 2 and sizes[0] != sizes[1], "the fixture must cut the image into unequal windows"
    with torch.no_grad():
        want = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output.numpy()
    got = run_once(vl25["onnx"] / "vision.onnx", {"pixel_values": batch["pixel_values"].numpy()})[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_greedy_tokens_equal_transformers_generate(vl25, original, processor):
    model = OnnxModel(vl25["onnx"])
    vision = model.manifest.vision
    tokenizer = load_tokenizer(vl25["onnx"])
    image = _image(5, SIZE)
    ids = image_prompt(tokenizer, "Describe the dog", chat=False, vision=vision)
    got = model.generate(ids, NEW, media=prepare(model.run, ids, image, vision)).tokens
    batch = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>Describe the dog"],
                      return_tensors="pt")
    assert batch["input_ids"][0].tolist() == ids
    with torch.no_grad():
        out = original.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = out[0, len(ids):].tolist()
    assert len(set(want)) >= 6, "fixture too degenerate for a token test"
    assert got == want
