"""The Axera kit against what AXERA-TECH/ax-llm's runtime reads, rule by rule (each rule and the runtime
source it comes from: docs/axera.md). The runtime needs the board, so its expectations are encoded here:
names, element counts (it sizes everything from them), dtypes, files, its config keys, its tokenizer
protocol."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import export_native

from surgery.compile.axera import ADAPTER as AXERA
from surgery.compile.base import CompileOptions
from surgery.manifest import Manifest

SEQ = 32
LAYER_IN = ["input", "indices", "mask", "K_cache", "V_cache"]
LAYER_OUT = ["output", "K_cache_out", "V_cache_out"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("axera-contract")
    onnx_dir = export_native("qwen2", root, SEQ)
    AXERA.compile(onnx_dir, root / "kit", CompileOptions("ax650"))
    return root / "kit", Manifest.read(onnx_dir)


def io(path: Path) -> tuple[dict, dict]:
    model = onnx.load(str(path), load_external_data=False)

    def table(values):
        return {v.name: (int(np.prod([d.dim_value for d in v.type.tensor_type.shape.dim])),
                         v.type.tensor_type.elem_type) for v in values}

    return table(model.graph.input), table(model.graph.output)


def test_every_layer_has_the_runtimes_io_and_sizes(kit):
    out, m = kit
    kv = m.num_kv_heads * m.head_dim
    for layer in range(m.num_layers):
        for half in ("prefill", "decode"):
            inputs, outputs = io(out / "onnx" / f"qwen2_p{SEQ}_l{layer}_{half}.onnx")
            # decode reads its history from K_cache/V_cache; the prefill group needs no history
            assert list(inputs) == (LAYER_IN if half == "decode" else LAYER_IN[:3]) and list(outputs) == LAYER_OUT
            assert inputs["indices"][1] == onnx.TensorProto.UINT32  # positions are uint32
            kv_cache_size = outputs["K_cache_out"][0] // (SEQ if half == "prefill" else 1)
            assert kv_cache_size == kv  # kv_cache_size = K_cache_out elements per token
            if half == "decode":
                assert inputs["K_cache"][0] // kv_cache_size == SEQ  # kv_cache_num
                assert inputs["mask"][0] - 1 == SEQ  # max_token_len = mask elements - 1
                assert inputs["indices"][0] == 1 and inputs["input"][0] == m.hidden_size
            else:
                assert inputs["indices"][0] == SEQ  # prefill_token_num = indices length
                assert inputs["mask"][0] == SEQ * SEQ and inputs["input"][0] == SEQ * m.hidden_size


def test_post_model_embedding_and_config(kit):
    out, m = kit
    inputs, outputs = io(out / "onnx" / "qwen2_post.onnx")
    assert list(inputs) == ["input"] and inputs["input"][0] == m.hidden_size
    assert list(outputs) == ["output"] and outputs["output"][0] == m.vocab_size
    config = json.loads((out / "config.json").read_text())
    assert config["axmodel_num"] == m.num_layers and config["template_filename_axmodel"].count("%d") == 1
    assert config["tokens_embed_num"] == m.vocab_size and config["tokens_embed_size"] == m.hidden_size
    embed = out / config["filename_tokens_embed"]
    assert embed.stat().st_size == config["tokens_embed_num"] * config["tokens_embed_size"] * 2  # raw bf16
    post = json.loads((out / config["post_config_path"]).read_text())
    assert {"temperature", "top_k", "top_p", "repetition_penalty", "penalty_window"} <= set(post)


def test_tokenizer_server_answers_the_runtimes_requests(kit):
    """ax-llm's HTTP tokenizer: GET /bos_id and /eos_id, POST /encode {"text", "img_prompt"}, POST /decode."""
    from surgery.tokserver import make_server

    out, _ = kit
    server = make_server(out, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(base + path, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(request, timeout=5).read())

        ids = post("/encode", {"text": "hello", "img_prompt": False})["token_ids"]
        assert ids and all(isinstance(i, int) for i in ids)
        assert isinstance(post("/decode", {"token_ids": ids})["text"], str)
        for path, key in (("/bos_id", "bos_id"), ("/eos_id", "eos_id")):
            assert key in json.loads(urllib.request.urlopen(base + path, timeout=5).read())
    finally:
        server.shutdown()
