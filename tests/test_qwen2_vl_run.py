"""`surgery run --image` on the tiny Qwen2-VL export: the host preprocessing, prompt and multimodal-RoPE
positions equal what transformers' processor and model compute, and greedy tokens equal generate()'s."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import run_cli
from test_pack_qwen2_vl import _image, original, vl  # noqa: F401  (module fixtures, rebuilt for this module)

from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.runtime import OnnxModel, load_tokenizer
from surgery.vision_input import image_prompt, load_image, mrope_positions, prepare, preprocess

NEW = 24


@pytest.fixture(scope="module")
def processor(vl):  # noqa: F811
    """transformers' Qwen2VLProcessor with its PIL image processor and no video processor (the video one needs
    torchvision, which is not installed; the processor's class check is told to accept the missing one)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(vl["src"]),
                                tokenizer=load_tokenizer(vl["onnx"]))


@pytest.fixture(scope="module")
def photo(vl):  # noqa: F811
    """60 x 90 pixels: the processor resizes it (bicubic) to 56 x 84, the exported size."""
    path = vl["root"] / "photo.png"
    _image(7, (60, 90)).save(path)
    return path


def test_preprocessing_equals_the_processor(vl, processor, photo):  # noqa: F811
    vision = Manifest.read(vl["onnx"]).vision
    want = processor.image_processor(images=[load_image(photo)], return_tensors="np")
    assert want["image_grid_thw"].tolist() == [vision["grid_thw"]]
    got = preprocess(load_image(photo), vision)
    assert got.shape == want["pixel_values"].shape and got.dtype == np.float32
    assert np.abs(got - want["pixel_values"]).max() < 1e-5


def test_prompt_and_positions_equal_the_processor_and_model(vl, processor, original, photo):  # noqa: F811
    vision = Manifest.read(vl["onnx"]).vision
    tokenizer = load_tokenizer(vl["onnx"])
    ids = image_prompt(tokenizer, "Describe the dog", chat=False, vision=vision)
    text = "<|vision_start|><|image_pad|><|vision_end|>Describe the dog"
    batch = processor(images=[load_image(photo)], text=[text], return_tensors="pt")
    assert ids == batch["input_ids"][0].tolist()
    positions, delta = mrope_positions(ids, vision)
    assert batch["mm_token_type_ids"][0].tolist() == [int(i == vision["image_token_id"]) for i in ids]
    want, want_delta = original.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                     batch["image_grid_thw"])
    assert positions.tolist() == want[:, 0].tolist() and delta == int(want_delta)


def _hf_tokens(original, processor, vl, photo, text: str) -> list[int]:  # noqa: F811
    batch = processor(images=[load_image(photo)], text=[text], return_tensors="pt")  # with mm_token_type_ids
    with torch.no_grad():
        out = original.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def test_greedy_tokens_equal_transformers_generate(vl, processor, original, photo):  # noqa: F811
    model = OnnxModel(vl["onnx"])
    vision = model.manifest.vision
    tokenizer = load_tokenizer(vl["onnx"])
    for question in ("Describe the dog", "What is in the sun?"):
        ids = image_prompt(tokenizer, question, chat=True, vision=vision)
        got = model.generate(ids, NEW, media=prepare(model.run, ids, load_image(photo), vision)).tokens
        text = tokenizer.decode(ids[:ids.index(vision["image_token_id"]) + 1]) + \
            tokenizer.decode(ids[ids.index(vision["image_token_id"]) + vision["tokens"]:])
        want = _hf_tokens(original, processor, vl, photo, text)
        assert len(set(want)) >= 6, "fixture too degenerate for a token test"
        assert got == want
    # the image matters: another image gives other tokens
    other = vl["root"] / "other.png"
    _image(8, (56, 84)).save(other)
    assert model.generate(ids, NEW, media=prepare(model.run, ids, load_image(other), vision)).tokens != got


_cli = run_cli  # surgery ARGS... in this process


def test_run_image_cli_equals_transformers(vl, processor, original, photo, monkeypatch, capsys):  # noqa: F811
    code, out, err = _cli(monkeypatch, capsys, "run", vl["onnx"], "--image", photo, "--prompt", "Describe the dog",
                          "--max-new-tokens", NEW, "--json")
    assert code == 0, err
    got = json.loads(out)["tokens"]
    want = _hf_tokens(original, processor, vl, photo, "<|vision_start|><|image_pad|><|vision_end|>Describe the dog")
    stop = load_tokenizer(vl["onnx"]).eos_token_id
    assert got == want[:len(got)] and (len(got) == NEW or got[-1] == stop)


@pytest.mark.parametrize("case, words", [
    ("missing", "cannot read it as an image"), ("not-image", "cannot read it as an image"),
    ("two-images", "holds 2 image tokens"), ("text-export", "not a vision-language export")])
def test_bad_image_input_is_one_line(vl, photo, tmp_path, monkeypatch, capsys, case, words):  # noqa: F811
    vision = Manifest.read(vl["onnx"]).vision
    target, image, extra = vl["onnx"], photo, ["--prompt", "hi"]
    if case == "missing":
        image = tmp_path / "nope.png"
    elif case == "not-image":
        image = tmp_path / "x.png"
        image.write_text("not an image")
    elif case == "two-images":
        extra = ["--prompt-ids", f"5,{vision['image_token_id']},{vision['image_token_id']},7"]
    else:
        from helpers import export_native

        target = export_native("qwen2", tmp_path)
    code, out, err = _cli(monkeypatch, capsys, "run", target, "--image", image, *extra)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_prepare_refuses_a_prompt_without_room_for_the_image(vl):  # noqa: F811
    model = OnnxModel(vl["onnx"], prepack=False)
    with pytest.raises(SurgeryError, match="6 embeddings"):
        prepare(model.run, [1, 2, model.manifest.vision["image_token_id"], 3], _image(1, (56, 84)),
                model.manifest.vision)
    assert os.path.isfile(vl["onnx"] / "vision.onnx")


def test_export_cli_image_size_and_optimized_graphs(vl, photo, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`--image-size` is parsed (a bad one is one line), and the generic-optimized export generates the same
    image-conditioned tokens."""
    code, _, err = _cli(monkeypatch, capsys, "export", vl["patched"], "--out", tmp_path / "bad", "-s", 64,
                        "--image-size", "56by84", "--trust-remote-code")
    assert code == 2 and "--image-size '56by84' is not a size" in err and len(err.strip().splitlines()) == 1
    from helpers import generic_copy

    args = ["--image", photo, "--prompt", "Describe the dog", "--max-new-tokens", 12, "--json"]
    tokens = []
    for where in (vl["onnx"], generic_copy(vl["onnx"], tmp_path / "generic")):
        code, out, err = _cli(monkeypatch, capsys, "run", where, *args)
        assert code == 0, err
        tokens.append(json.loads(out)["tokens"])
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 1


def test_text_only_prompt_on_a_vl_export_equals_generate(vl, original):  # noqa: F811
    """Without an image the three position components are equal: still token-identical to transformers."""
    ids = [5, 9, 17, 33, 41, 7]
    got = OnnxModel(vl["onnx"]).generate(ids, NEW).tokens
    with torch.no_grad():
        want = original.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
    assert got == want


def test_convert_with_image_size_gives_a_bundle_run_image_takes(vl, photo, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`surgery convert ... -c onnx --image-size 56x84`: the bundle keeps the vision graph and its record, and
    `run --image` on it generates what it generates on the export."""
    code, _, err = _cli(monkeypatch, capsys, "convert", "auto", "-m", vl["src"], "-o", tmp_path / "bundle", "-s", 64,
                        "-c", "onnx", "--image-size", "56x84", "--trust-remote-code")
    assert code == 0, err
    assert Manifest.read(tmp_path / "bundle").vision["image_size"] == [56, 84]
    args = ["--image", photo, "--prompt", "Describe the dog", "--max-new-tokens", 12, "--json"]
    runs = [json.loads(_cli(monkeypatch, capsys, "run", where, *args)[1])["tokens"]
            for where in (vl["onnx"], tmp_path / "bundle")]
    assert runs[0] == runs[1]
