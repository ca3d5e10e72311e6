"""`surgery export` / `verify` / `run` on the tiny Qwen-v1 fixtures: the graphs generate exactly what the
original model generates, every graph matches patched torch, and interrupted exports resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgery.errors import SurgeryError
from surgery.export import exporter
from surgery.export.exporter import ExportOptions, export_model
from surgery.export.verify import verify_export
from surgery.manifest import Manifest
from surgery.runtime import OnnxModel

SEQ = 64
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def onnx_dir(qwen_patched: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "graphs"
    export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True))
    return out


def prompt_ids(n: int = 12) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(3)).tolist()


@torch.no_grad()
def original_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy argmax loop of the original model (full recompute each step: no cache, no EOS logic)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_run_matches_original_tokens(onnx_dir: Path, qwen_original: Path):
    prompt = prompt_ids()
    want = original_greedy(qwen_original, prompt, NEW_TOKENS)
    assert len(set(want)) >= 8, "fixture too degenerate for a token test"
    got = OnnxModel(onnx_dir).generate(prompt, NEW_TOKENS)
    assert got.tokens == want
    assert got.prefill_ms > 0 and got.decode_tokens_per_s > 0


def test_every_graph_matches_patched_torch(onnx_dir: Path):
    rows = verify_export(onnx_dir, trust_remote_code=True)
    assert {r.graph for r in rows} == {g.name for g in Manifest.read(onnx_dir).graphs}
    worst = min(rows, key=lambda r: r.cosine)
    assert worst.cosine >= 0.99999, worst


def test_graphs_are_static_opset17_and_described(onnx_dir: Path):
    manifest = Manifest.read(onnx_dir)
    assert (manifest.seq_length, manifest.num_layers, manifest.num_kv_heads, manifest.head_dim) == (SEQ, 2, 4, 16)
    assert manifest.conventions["mask"]["value"] == -10000.0
    decode = manifest.graph("block_cache_1")
    assert [t.name for t in decode.inputs] == ["input_states", "position_ids", "attention_mask", "history_k",
                                               "history_v"]
    assert [t.shape for t in decode.outputs] == [[1, 1, 64], [1, 1, 4, 16], [1, 1, 4, 16]]
    assert decode.inputs[2].shape == [1, 1, 1, SEQ + 1]
    for graph in manifest.graphs:
        model = onnx.load(onnx_dir / graph.file)
        assert model.opset_import[0].version == 17
        for value in [*model.graph.input, *model.graph.output]:
            assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)
    assert not (onnx_dir / exporter.STATE).exists()


def test_interrupted_export_resumes_to_same_files(qwen_patched: Path, onnx_dir: Path, tmp_path: Path):
    out = tmp_path / "graphs"
    calls: list[str] = []

    def die_after_three(name: str) -> None:
        calls.append(name)
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True), die_after_three)
    assert not (out / "manifest.json").exists()
    resumed: list[str] = []
    export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True), resumed.append)
    # the first three finished (the vocabulary table, embedding, embedding_cache); block_0 was interrupted
    assert calls[:3] == ["embedding.onnx.data", "embedding", "embedding_cache"]
    assert [r for r in resumed if not r.endswith(".data")] == [g.name for g in Manifest.read(onnx_dir).graphs][2:]
    for graph in Manifest.read(onnx_dir).graphs:
        assert (out / graph.file).read_bytes() == (onnx_dir / graph.file).read_bytes(), graph.file
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in onnx_dir.iterdir())


def test_prompt_longer_than_seq_is_refused(onnx_dir: Path):
    with pytest.raises(SurgeryError, match="the prompt has 64 tokens; this export takes 1 to 63"):
        OnnxModel(onnx_dir).generate(list(range(SEQ)), 4)


@pytest.mark.parametrize("case", ["not-applied", "no-trust", "blocks", "corrupt-weights", "missing-weights"])
def test_bad_export_input(case: str, qwen_src: Path, qwen_patched: Path, tmp_path: Path):
    model, options = qwen_patched, ExportOptions(seq_length=SEQ, trust_remote_code=True)
    expect = {"not-applied": "was not produced by `surgery apply`; run `surgery apply",
              "no-trust": "pass --trust-remote-code", "blocks": "--blocks 7 is out of range",
              "corrupt-weights": "is not a readable safetensors file", "missing-weights": "has no *.safetensors"}[case]
    if case == "not-applied":
        model = qwen_src
    elif case == "no-trust":
        options = ExportOptions(seq_length=SEQ)
    elif case == "blocks":
        options = ExportOptions(seq_length=SEQ, blocks=(7,), trust_remote_code=True)
    else:
        model = tmp_path / "m"
        shutil.copytree(qwen_patched, model, symlinks=False)
        weights = model / "model.safetensors"
        weights.unlink()
        if case == "corrupt-weights":
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(SurgeryError) as err:
        export_model(model, tmp_path / "out", options)
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_records_source_and_versions(onnx_dir: Path, qwen_patched: Path):
    raw = json.loads((onnx_dir / "manifest.json").read_text())
    record = json.loads((qwen_patched / "surgery.json").read_text())
    assert raw["source"]["hashes"] == record["hashes"]
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(raw["versions"])


def test_half_precision_exports(qwen_patched: Path, tmp_path: Path):
    fp16 = tmp_path / "fp16"
    export_model(qwen_patched, fp16, ExportOptions(seq_length=SEQ, dtype="fp16", trust_remote_code=True))
    assert Manifest.read(fp16).graph("block_0").inputs[0].dtype == "float16"
    assert min(r.cosine for r in verify_export(fp16, trust_remote_code=True)) >= 0.999
    assert len(OnnxModel(fp16).generate(prompt_ids(), 4).tokens) == 4
    bf16 = tmp_path / "bf16"
    export_model(qwen_patched, bf16, ExportOptions(seq_length=SEQ, dtype="bf16", trust_remote_code=True))
    with pytest.raises(SurgeryError, match="numpy, which has no bfloat16"):
        OnnxModel(bf16)


def test_sample_head_semantics():
    """LLM-TPU's `sample_head`: repetition penalty, top-50 candidates cut to top_k, temperature, top-p with a
    minimum kept; inputs in the runtime's order (m_logits, input_ids, penalty, temperature, top_k, top_p)."""
    from surgery.export.blocks import SampleHead

    logits = torch.full((1, 64), -5.0)
    logits[0, :8] = torch.tensor([4.0, 3.0, 2.0, 1.5, 0.5, -1.0, -2.0, -3.0])
    head = SampleHead(min_keep=2)
    ids = torch.tensor([[0, 0]], dtype=torch.int32)
    k = lambda n: torch.tensor([n], dtype=torch.int32)  # noqa: E731
    probs, tokens = head(logits, ids, torch.tensor([3.0]), torch.tensor([1.0]), k(4), torch.tensor([0.01]))
    assert tokens.dtype == torch.int32 and tokens.shape == (1, 50)
    assert tokens[0, :4].tolist() == [1, 2, 3, 0]  # token 0 was seen: 4.0 / 3 drops below 1.5
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    assert (probs[0, :2] > 0.01).all() and (probs[0, 2:] < 1e-6).all()  # top_p tiny: only min_keep survive
    probs, tokens = head(logits, torch.tensor([[7, 7]], dtype=torch.int32), torch.tensor([1.0]),
                         torch.tensor([1.0]), k(3), torch.tensor([1.0]))
    assert probs[0, 0] > probs[0, 1] > probs[0, 2] > 0 and (probs[0, 3:] < 1e-6).all()  # only top_k=3 remain
    probs, tokens = head(logits, ids, torch.tensor([1.0]), torch.tensor([1.0]), k(1), torch.tensor([0.8]))
    assert tokens[0, 0] == 0 and probs[0, 0] == 1.0  # top_k 1 is greedy


def test_large_graphs_keep_weights_in_one_data_file(qwen_patched: Path, onnx_dir: Path, tmp_path: Path):
    out = tmp_path / "ext"
    # every graph with more than 100 kB of weights goes external, as a >2 GB graph would
    export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                  external_data_above=100_000))
    manifest = Manifest.read(out)
    external = {g.name for g in manifest.graphs if g.data_file}
    assert {"embedding", "block_0", "block_cache_1", "lm_head"} <= external and "greedy_head" not in external
    for graph in manifest.graphs:
        model = onnx.load(out / graph.file, load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == ({graph.data_file} if graph.data_file else set())
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".data")) == sorted(
        {g.data_file for g in manifest.graphs if g.data_file})
    # one vocabulary table, shared by both embedding graphs
    assert manifest.graph("embedding").data_file == manifest.graph("embedding_cache").data_file
    prompt = prompt_ids()
    assert OnnxModel(out).generate(prompt, 8).tokens == OnnxModel(onnx_dir).generate(prompt, 8).tokens


def test_embedding_disk_writes_rounded_bf16_table(qwen_patched: Path, onnx_dir: Path, tmp_path: Path):
    out = tmp_path / "disk"
    export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True, embedding_disk=True))
    manifest = Manifest.read(out)
    assert not {"embedding", "embedding_cache"} & {g.name for g in manifest.graphs}
    assert manifest.embedding_file["rounding"] == "nearest-even" and manifest.embedding_file["shape"] == [512, 64]
    raw = np.fromfile(out / "embedding.bin", dtype="<u2").reshape(512, 64)
    fp32 = load_file(str(qwen_patched / "model.safetensors"))["transformer.wte.weight"]
    nearest = fp32.to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    truncated = (fp32.numpy().view(np.uint32) >> 16).astype("<u2")
    assert np.array_equal(raw, nearest) and not np.array_equal(raw, truncated)
    rows = verify_export(out, trust_remote_code=True)
    assert [r.cosine for r in rows if r.graph == "embedding.bin"] == [1.0]
    assert len(OnnxModel(out).generate(prompt_ids(), 8).tokens) == 8


@pytest.mark.filterwarnings("ignore")
def test_dynamo_exporter_matches_torchscript(qwen_patched: Path, onnx_dir: Path, tmp_path: Path):
    out = tmp_path / "dynamo"
    manifest = export_model(qwen_patched, out, ExportOptions(seq_length=SEQ, trust_remote_code=True,
                                                             exporter="dynamo"))
    assert manifest.exporter == "dynamo" and manifest.opset >= 17
    assert min(r.cosine for r in verify_export(out, trust_remote_code=True)) >= 0.99999
    prompt = prompt_ids()
    assert OnnxModel(out).generate(prompt, 16).tokens == OnnxModel(onnx_dir).generate(prompt, 16).tokens


def test_kill_9_mid_export_then_rerun_gives_the_clean_files(qwen_patched: Path, tmp_path: Path):
    """Each run in its own process, as a user would: a clean export, and one killed with SIGKILL after its
    third graph and then rerun; the two directories hold the same files, byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    import time

    surgery = str(Path(sys.executable).with_name("surgery"))

    def command(out: Path) -> list[str]:
        return [surgery, "export", str(qwen_patched), "--out", str(out), "--seq-length", str(SEQ),
                "--trust-remote-code", "--json"]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command(clean), check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("*.onnx"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "export finished before it could be killed"
    subprocess.run(command(killed), check=True, capture_output=True)
    names = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in killed.iterdir()) == names
    for name in names:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
