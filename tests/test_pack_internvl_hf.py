"""transformers' native InternVL (the `-hf` checkpoints) on a tiny random-weight fixture: the pack applies and
picks itself from model_type, the vision graph equals the model's get_image_features, the pixels and prompt
equal InternVLProcessor's (its PIL GotOcr2 image processor), and greedy tokens equal generate() with an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pack_internvl import SEQ, _image

from surgery.apply import plan_apply, write_plan
from surgery.errors import SurgeryError
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.manifest import Manifest
from surgery.onnxio import run_once
from surgery.packs import ApplyOptions, get_pack, pack_for_model_type
from surgery.runtime import OnnxModel, load_tokenizer
from surgery.vision_input import image_prompt, load_image, prepare, preprocess

NEW = 24


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    from transformers import GotOcr2ImageProcessorPil, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    from surgery.fixtures.internvl_hf import build

    root = tmp_path_factory.mktemp("internvl-hf")
    src = build(root / "src")
    write_plan(plan_apply(get_pack("internvl_hf"), src, ApplyOptions(seq_length=SEQ, dtype="fp32")),
               root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True))
    photo = root / "photo.png"
    _image(7, (150, 120)).save(photo)
    check = ProcessorMixin.check_argument_for_proper_class  # no video processor: it needs torchvision
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
        processor = InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(src),
                                      tokenizer=load_tokenizer(root / "onnx"), image_seq_length=16)
    original = InternVLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    return {"src": src, "onnx": root / "onnx", "photo": photo, "processor": processor, "original": original}


def _batch(hf, question: str):
    """What the processor gives for the chat prompt `<image>` + question, one tile (InternVLProcessor crops to up
    to 12 tiles plus a thumbnail by default; the export takes the whole image as one tile, crop_to_patches off)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf["processor"].tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf["processor"](images=[load_image(hf["photo"])], text=[text], crop_to_patches=False,
                           return_tensors="pt")


def test_apply_auto_picks_the_pack_and_every_graph_verifies(hf):
    assert pack_for_model_type("internvl").name == "internvl_hf"
    with pytest.raises(SurgeryError, match="language model is 'internlm2'; the internvl_hf pack handles"):
        get_pack("internvl_hf").check_config({"text_config": {"model_type": "internlm2"}})
    rows = verify_export(hf["onnx"], trust_remote_code=True)
    assert "vision" in {r.graph for r in rows} and min(r.cosine for r in rows) > 0.99999


def test_vision_graph_and_pixels_equal_the_model_and_processor(hf):
    vision = Manifest.read(hf["onnx"]).vision
    batch = _batch(hf, "Describe the dog")
    got = preprocess(load_image(hf["photo"]), vision)
    assert got.shape == tuple(batch["pixel_values"].shape) == (1, 3, 112, 112)
    assert np.abs(got - batch["pixel_values"].numpy()).max() < 1e-5
    with torch.no_grad():
        want = hf["original"].model.get_image_features(batch["pixel_values"], vision_feature_layer=-1,
                                                       vision_feature_select_strategy="default").pooler_output[0]
    out = run_once(hf["onnx"] / "vision.onnx", {"pixel_values": got})[0]
    cos = float(np.dot(out.ravel(), want.numpy().ravel()) / np.linalg.norm(out) / np.linalg.norm(want.numpy()))
    assert out.shape == (16, 64) and cos > 0.99999 and np.abs(out - want.numpy()).max() < 1e-4


def test_greedy_tokens_equal_generate_with_the_image(hf):
    model = OnnxModel(hf["onnx"])
    vision, tokenizer = model.manifest.vision, load_tokenizer(hf["onnx"])
    for question in ("Describe the dog", "What is in the sun?"):
        ids = image_prompt(tokenizer, question, chat=True, vision=vision)
        batch = _batch(hf, question)
        assert ids == batch["input_ids"][0].tolist()
        got = model.generate(ids, NEW, media=prepare(model.run, ids, load_image(hf["photo"]), vision)).tokens
        with torch.no_grad():
            want = hf["original"].generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)[0, len(ids):].tolist()
        assert len(set(want)) >= 6, "fixture too degenerate for a token test"
        assert got == want
