"""Qwen2-VL on a tiny random-weight fixture: the pack applies, export writes a static `vision` graph and
multimodal-RoPE blocks, and each agrees with transformers' own model (not only with our wrappers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.apply import plan_apply, write_plan
from surgery.errors import SurgeryError
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.manifest import Manifest
from surgery.onnxio import run_once
from surgery.packs import ApplyOptions, get_pack

SEQ, SIZE = 64, (56, 84)  # 4 x 6 patches of 14 pixels -> 6 image tokens after the 2x2 merge


def _image(seed: int, size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> dict[str, Path]:
    from surgery.fixtures.qwen2_vl import build_qwen2_vl

    root = tmp_path_factory.mktemp("qwen2vl")
    src = build_qwen2_vl(root / "src")
    write_plan(plan_apply(get_pack("qwen2_vl"), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), root / "patched")
    export_model(root / "patched", root / "onnx", ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                                image_size=SIZE))
    return {"src": src, "patched": root / "patched", "onnx": root / "onnx", "root": root}


@pytest.fixture(scope="module")
def original(vl):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(vl["src"], dtype=torch.float32).eval()


def test_vision_graph_matches_the_model_tower(vl, original):
    """The exported tower on the processor's own pixels equals transformers' `model.visual` output."""
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil.from_pretrained(vl["src"])
    batch = proc(images=[_image(1, SIZE)], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    with torch.no_grad():
        want = original.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    got = run_once(vl["onnx"] / "vision.onnx", {"pixel_values": batch["pixel_values"].numpy()})[0]
    assert got.shape == (6, 64)
    cos = float(np.dot(got.ravel(), want.numpy().ravel()) / np.linalg.norm(got) / np.linalg.norm(want.numpy()))
    assert cos > 0.99999 and np.abs(got - want.numpy()).max() < 1e-4


def test_every_graph_matches_patched_torch(vl):
    rows = verify_export(vl["onnx"], trust_remote_code=True)
    assert {r.graph for r in rows} >= {"vision", "block_0", "block_cache_1", "lm_head"}
    assert min(r.cosine for r in rows) > 0.99999


def test_manifest_says_positions_have_three_components(vl):
    m = Manifest.read(vl["onnx"])
    block, decode = m.graph("block_0"), m.graph("block_cache_0")
    assert next(t.shape for t in block.inputs if t.name == "position_ids") == [3, 1, SEQ]
    assert next(t.shape for t in decode.inputs if t.name == "position_ids") == [3, 1, 1]
    assert m.conventions["position_ids"].startswith("int32 [3, 1, S]")
    assert m.conventions["mrope"]["sections"] == [2, 3, 3]
    v = m.vision
    assert (v["image_size"], v["grid_thw"], v["tokens"]) == ([56, 84], [1, 4, 6], 6)
    assert (v["patch_size"], v["temporal_patch_size"], v["merge_size"], v["resample"]) == (14, 2, 2, "bicubic")
    assert v["image_mean"][0] == pytest.approx(0.48145466) and v["image_token_id"] == original_token(vl, "image")
    assert m.graph("vision").inputs[0].shape == [24, 3 * 2 * 14 * 14]


def original_token(vl, kind: str) -> int:
    import json

    return json.loads((vl["src"] / "config.json").read_text())[f"{kind}_token_id"]


def test_mrope_blocks_match_the_model_with_image_positions(vl, original):
    """Prefill logits through the exported graphs, fed the model's own 3-D positions and merged embeddings,
    equal transformers' forward on the same image prompt (the per-component rotary gather is right)."""
    from surgery.runtime import OnnxModel

    m = Manifest.read(vl["onnx"])
    ids = torch.tensor([[5, 9, m.vision["vision_start_token_id"], *[m.vision["image_token_id"]] * 6,
                         m.vision["vision_end_token_id"], 17, 33, 41]])
    n = ids.shape[1]
    from transformers import Qwen2VLImageProcessorPil

    batch = Qwen2VLImageProcessorPil.from_pretrained(vl["src"])(images=[_image(2, SIZE)], return_tensors="pt")
    types = (ids == m.vision["image_token_id"]).int()
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                        mm_token_type_ids=types).logits[0, -1].numpy()
        pos, _ = original.model.get_rope_index(ids, types, batch["image_grid_thw"])
    assert len({tuple(p) for p in pos[:, 0].tolist()}) == 3, "positions must differ per component"
    rt = OnnxModel(vl["onnx"], prepack=False)
    padded = np.zeros((1, SEQ), np.int32)
    padded[0, :n] = ids[0].numpy()
    hidden = rt.embed(padded)
    hidden[0, 3:9] = rt.run("vision", pixel_values=batch["pixel_values"].numpy())[0]
    positions = np.zeros((3, 1, SEQ), np.int32)
    positions[:, :, :n] = pos.numpy()
    from surgery.contract import prefill_mask

    for i in range(m.num_layers):
        hidden = rt.run(f"block_{i}", input_states=hidden, position_ids=positions,
                        attention_mask=prefill_mask(SEQ, n))[0]
    got = rt.run("lm_head", hidden_states=hidden[:, n - 1])[0][0]
    assert np.abs(got - want).max() < 1e-3 and int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("size, words", [((50, 84), "multiples of 28"), ((280, 280), "no room for a prompt")])
def test_bad_image_size_is_one_line(vl, tmp_path, size, words):
    with pytest.raises(SurgeryError, match=words) as err:
        export_model(vl["patched"], tmp_path / "o", ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                                  image_size=size))
    assert "\n" not in str(err.value)


def test_tied_head_streams_from_the_stored_embedding(tmp_path):
    """Qwen2-VL-2B ties its head to the embedding, which its checkpoint stores once as `model.embed_tokens`: the
    head's table is found through both the tie and the checkpoint prefix, and tokens equal generate()'s."""
    from safetensors import safe_open
    from transformers import Qwen2VLForConditionalGeneration

    from surgery.fixtures.qwen2_vl import build_qwen2_vl
    from surgery.runtime import OnnxModel

    src = build_qwen2_vl(tmp_path / "src", seed=1, tied=True)
    with safe_open(str(src / "model.safetensors"), "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
    write_plan(plan_apply(get_pack("qwen2_vl"), src, ApplyOptions(seq_length=SEQ, dtype="fp32")), tmp_path / "p")
    export_model(tmp_path / "p", tmp_path / "o", ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                              image_size=SIZE))
    ids = [5, 9, 17, 33, 41, 7]
    got = OnnxModel(tmp_path / "o").generate(ids, 16).tokens
    model = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert got == want
