"""Sophgo adapter: flags per graph kind (always), and, where the TPU-MLIR toolchain is installed, real
compiles of the fixture for bm1684x with every graph checked on the CPU simulator against onnxruntime."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch
from helpers import export_native, generic_copy

from surgery.checks import DELTA
from surgery.compile.base import CompileOptions
from surgery.compile.sophgo import ADAPTER as SOPHGO
from surgery.compile.sophgo import MIN_COSINE
from surgery.compile.sophgo_graphs import deploy_flags
from surgery.compile.toolchains import bin_env, installed
from surgery.errors import SurgeryError
from surgery.fsutil import sha256_file
from surgery.manifest import Manifest
from surgery.passes import PASSES, run_pass

needs_tpu_mlir = pytest.mark.skipif(installed("sophgo") is None, reason="TPU-MLIR toolchain absent: run "
                                    "`surgery toolchain install sophgo` (make toolchains)")
SEQ = 32


def test_deploy_flags_follow_the_graph_kind(tmp_path: Path):
    o = CompileOptions(chip="bm1688", quantize="w4bf16", group_size=128, symmetric=True, num_core=2)
    graph = lambda kind: type("G", (), {"kind": kind})()  # noqa: E731
    decode = deploy_flags(graph("block_cache"), o)
    assert decode[:3] == ["--quantize", "W4BF16", "--quant_input"] and "--addr_mode" in decode
    assert ["--q_group_size", "128"] == decode[decode.index("--q_group_size"):][:2] and "--q_symmetric" in decode
    assert "--addr_mode" not in deploy_flags(graph("block"), o)
    assert deploy_flags(graph("lm_head"), o)[:3] == ["--quantize", "BF16", "--quant_input"]
    assert "--quant_output" not in deploy_flags(graph("lm_head"), o)
    assert deploy_flags(graph("greedy_head"), o)[:2] == ["--quantize", "F32"]
    assert ["--num_core", "2"] == deploy_flags(graph("block"), o)[-2:]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama fixture at transformers' default init range (0.02), as real checkpoints are scaled."""
    return export_native("llama", tmp_path_factory.mktemp("sophgo"), SEQ, initializer_range=0.02)


@needs_tpu_mlir
@pytest.mark.parametrize(("quantize", "check"), [("f16", "all"), ("w4bf16", "sample")])
def test_bm1684x_compile_on_the_simulator(onnx_dir: Path, tmp_path: Path, quantize: str, check: str):
    manifest = SOPHGO.compile(onnx_dir, tmp_path / "out", CompileOptions("bm1684x", quantize=quantize, group_size=32,
                                                                       check=check))
    assert (tmp_path / "out" / f"llama_{quantize}_seq{SEQ}_1dev.bmodel").is_file()
    rows = manifest.compiled.parity
    everything = {g.name for g in manifest.graphs}
    # sample: embeddings, every decode block and the head; prefill blocks and weightless heads at `all`
    skipped = {"block_0", "block_1", "greedy_head", "sample_head"}
    want = everything if check == "all" else everything - skipped
    assert {r["graph"] for r in rows} == want and manifest.compiled.check == check
    hidden = [r["cosine"] for r in rows if r["output"] == "hidden_states"]
    assert len(hidden) == (4 if check == "all" else 2) and min(hidden) >= MIN_COSINE[quantize]
    assert len([r for r in rows if r["output"] == DELTA]) == len(hidden)
    assert ["--addr_mode", "io_alone"] == [f for f in manifest.compiled.details["routes"]["block_cache_0"]["deploy"]
                                           if f in ("--addr_mode", "io_alone")]
    # a rerun compiles nothing: every graph comes from the cache
    again = tmp_path / "again"
    SOPHGO.compile(onnx_dir, again, CompileOptions("bm1684x", quantize=quantize, group_size=32, check="none"))
    assert not list((again / "work").glob("*/compile.log"))
    assert Manifest.read(again).compiled.parity == []
    # the cost of each check, and of each graph this run built (none: all cached), as the bench reads them
    assert set(manifest.compiled.details["simulate_seconds"]) == {r["graph"] for r in rows}
    assert Manifest.read(again).compiled.details["build_seconds"] == {}


@needs_tpu_mlir
def test_a_rerun_rebuilds_only_what_changed(onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One block's weights changed: that block alone is rebuilt. One option changed (the group size): the
    quantized blocks are rebuilt, the tables and heads come from the cache."""
    from onnx import numpy_helper

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))  # its own: no build of an earlier run counts
    options = CompileOptions("bm1684x", "w4bf16", 32, check="none")
    SOPHGO.compile(onnx_dir, tmp_path / "first", options)  # every graph built or found in the cache
    changed = shutil.copytree(onnx_dir, tmp_path / "changed")
    path = changed / "block_cache_1.onnx"
    model, before = onnx.load(path), sha256_file(path)
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    weight = max(weights, key=lambda t: numpy_helper.to_array(t).size)  # a projection's weight
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, path)
    assert sha256_file(path) != before
    manifest = Manifest.read(changed, check=False)  # its record of the block is what we fix here
    manifest.graphs = [g if g.name != "block_cache_1" else replace(g, sha256=sha256_file(path))
                       for g in manifest.graphs]
    manifest.write(changed)

    def rebuilt(out: Path) -> set[str]:
        return {log.parent.name for log in (out / "work").glob("*/compile.log")}

    SOPHGO.compile(changed, tmp_path / "second", options)
    assert rebuilt(tmp_path / "second") == {"block_cache_1"}
    SOPHGO.compile(onnx_dir, tmp_path / "third", CompileOptions("bm1684x", "w4bf16", 64, check="none"))
    assert rebuilt(tmp_path / "third") == {"block_0", "block_1", "block_cache_0", "block_cache_1"}


@needs_tpu_mlir
def test_compiler_failure_reports_graph_and_log(onnx_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    # a valid graph the compiler cannot take: an op from a custom domain
    head = Manifest.read(broken).graph("sample_head")
    node = onnx.helper.make_node("Frobnicate", [head.inputs[0].name], [head.outputs[0].name], domain="com.example")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info(
        head.inputs[0].name, onnx.TensorProto.FLOAT, head.inputs[0].shape)], [onnx.helper.make_tensor_value_info(
            head.outputs[0].name, onnx.TensorProto.FLOAT, head.inputs[0].shape)])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                            onnx.helper.make_opsetid("com.example", 1)]),
              broken / head.file)
    manifest = Manifest.read(broken, check=False)  # it vouches for the graph we just replaced
    manifest.graph(head.name).sha256 = sha256_file(broken / head.file)
    manifest.write(broken)
    with pytest.raises(SurgeryError) as err:
        SOPHGO.compile(broken, tmp_path / "out", CompileOptions("bm1684x", quantize="f16", jobs=1))
    message = str(err.value)
    assert "model_transform of graph sample_head failed" in message
    assert f"last 30 lines of {tmp_path / 'out' / 'work' / 'sample_head' / 'compile.log'}" in message
    (broken / "lm_head.onnx").write_bytes(b"not a model")  # a damaged graph: one line before any compiling
    with pytest.raises(SurgeryError, match="graph lm_head: lm_head.onnx does not match the manifest"):
        SOPHGO.compile(broken, tmp_path / "out2", CompileOptions("bm1684x", quantize="f16", jobs=1))


def test_opset23_graphs_are_refused_with_the_fix(onnx_dir: Path, tmp_path: Path):
    generic = generic_copy(onnx_dir, tmp_path / "generic")
    with pytest.raises(SurgeryError, match="run `surgery optimize .* --target bm1684x`"):
        SOPHGO.compile(generic, tmp_path / "out", CompileOptions("bm1684x"))
    assert Manifest.read(generic).opset == 23


@needs_tpu_mlir
def test_workaround_opset18_reducemean_reproduced_and_avoided(tmp_path: Path):
    """The registry says TPU-MLIR rejects opset-18 ReduceMean and the opset17 pass avoids it: show both."""
    class Norm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    buf = io.BytesIO()
    torch.onnx.export(Norm(), (torch.randn(1, 4, 8),), buf, opset_version=18, dynamo=False, input_names=["x"])
    model = onnx.load_from_string(buf.getvalue())

    def transform(m: onnx.ModelProto, name: str) -> subprocess.CompletedProcess:
        onnx.save(m, tmp_path / f"{name}.onnx")
        return subprocess.run(["model_transform", "--model_name", name, "--model_def", f"{name}.onnx",
                               "--input_shapes", "[[1,4,8]]", "--mlir", f"{name}.mlir"], cwd=tmp_path,
                              env=bin_env("sophgo"), capture_output=True, text=True)

    before = transform(model, "opset18")
    assert before.returncode != 0 and "Unsupport opset" in before.stdout + before.stderr
    after = transform(run_pass(model, PASSES["opset17"])[0], "opset17")
    assert after.returncode == 0, after.stdout[-2000:]


def build_net(worker, gdir: Path, model: onnx.ModelProto, shapes: list[list[int]], flags: list[str]) -> Path:
    """model_transform and model_deploy of one small graph for bm1684x, as the adapter runs them."""
    name = gdir.name
    gdir.mkdir()
    onnx.save(model, gdir / f"{name}.onnx")
    worker.call("transform", "transform", gdir / "log", workdir=gdir, name=name, onnx=gdir / f"{name}.onnx",
                shapes=shapes, extra=[])
    worker.call("deploy", "deploy", gdir / "log", workdir=gdir, args=[
        "--mlir", str(gdir / f"{name}.mlir"), *flags, "--chip", "bm1684x", "--model", str(gdir / f"{name}.bmodel")])
    return gdir / f"{name}.bmodel"


@needs_tpu_mlir
def test_workaround_argmax_vocabulary_reproduced_and_avoided(tmp_path: Path):
    """TPU-MLIR cannot generate an ArgMax over a 32001 vocabulary (MiniCPM-2B's 122753 likewise); the
    argmax_pad pass makes the greedy head build, and on the simulator it still picks the first largest."""
    import numpy as np

    from surgery.compile.tpumlir import TpuMlirWorker
    from surgery.passes.testing import export

    class Greedy(torch.nn.Module):
        def forward(self, logits: torch.Tensor) -> torch.Tensor:
            return torch.argmax(logits, dim=-1, keepdim=True)

    vocab = 32001
    model = export(Greedy(), torch.zeros(1, vocab), names=["m_logits"])
    worker = TpuMlirWorker()
    try:
        def build(m: onnx.ModelProto, name: str) -> Path:
            return build_net(worker, tmp_path / name, m, [[1, vocab]], ["--quantize", "F32"])

        with pytest.raises(SurgeryError, match="deploy failed"):
            build(model, "plain")
        bmodel = build(run_pass(model, PASSES["argmax_pad"])[0], "padded")
        logits = np.random.default_rng(0).standard_normal((1, vocab)).astype(np.float32)
        logits[0, [7, vocab - 1]] = 50.0  # a tie: the first wins
        np.savez(tmp_path / "in.npz", m_logits=logits)
        worker.call("simulate", "simulate", tmp_path / "sim.log", bmodel=bmodel, net="padded",
                    inputs=tmp_path / "in.npz", outputs=tmp_path / "out.npz")
        assert np.load(tmp_path / "out.npz")[np.load(tmp_path / "out.npz").files[0]].item() == 7
    finally:
        worker.close()


def test_a_relative_cache_path_is_made_absolute(monkeypatch: pytest.MonkeyPatch):
    """model_tool --combine runs in the output directory: a relative SURGERY_CACHE must not reach it as is."""
    from surgery.compile.sophgo import cache_dir

    monkeypatch.setenv("SURGERY_CACHE", "build/cache")
    assert cache_dir().is_absolute() and cache_dir() == Path.cwd() / "build" / "cache" / "sophgo"


def test_sample_on_a_simulator_runs_three_layers():
    """`sample` checks every decode block on onnxruntime, but on a simulator the first, a middle and the last
    (an 80-layer model: 3 simulations, not 80); `all` runs everything either way."""
    from types import SimpleNamespace

    from surgery.checks import sampled

    kinds = ["embedding", "embedding_cache", *(["block", "block_cache"] * 8), "lm_head", "greedy_head"]
    layers = [None, None, *(i // 2 for i in range(16)), None, None]
    graphs = [SimpleNamespace(name=f"{k}_{n}", kind=k, layer=n) for k, n in zip(kinds, layers, strict=True)]
    manifest = SimpleNamespace(graphs=graphs)
    cheap, costly = sampled(manifest, "sample"), sampled(manifest, "sample", costly=True)
    assert [g.layer for g in cheap if g.kind == "block_cache"] == list(range(8))
    assert [g.layer for g in costly if g.kind == "block_cache"] == [0, 4, 7]
    assert {g.kind for g in costly} == {"embedding", "embedding_cache", "block_cache", "lm_head"}
    assert sampled(manifest, "all", costly=True) == graphs and sampled(manifest, "none") == []


@needs_tpu_mlir
def test_workaround_packed_projection_window_reproduced_and_avoided(tmp_path: Path):
    """A decode block built with --quant_output and --addr_mode io_alone returns zeros for an output that is
    an in-place window into a packed projection (Baichuan's W_pack -> v -> past_v; found at Baichuan2-7B's
    shape); packed_projection gives each part its own MatMul and the output comes back."""
    import numpy as np

    from surgery.compile.tpumlir import TpuMlirWorker
    from surgery.parity import compare
    from surgery.passes.testing import export, run

    hidden = 128

    class Block(torch.nn.Module):  # Baichuan's attention input, and past_v both returned and read
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.W_pack = torch.nn.Linear(hidden, 3 * hidden, bias=False)
            self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)

        def forward(self, x: torch.Tensor, history_v: torch.Tensor):
            proj = self.W_pack(x).unflatten(-1, (3, hidden)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            q, k, v = proj[0], proj[1], proj[2]
            past_v = v.reshape(1, 1, 2, hidden // 2)
            values = torch.cat([history_v, past_v], dim=1).reshape(1, 5, hidden)
            weights = torch.softmax((q * k).sum(-1, keepdim=True).expand(1, 5, 1), dim=1)
            return self.o_proj((values * weights).sum(1, keepdim=True)) + x, past_v

    feeds = {"input_states": torch.randn(1, 1, hidden), "history_v": torch.randn(1, 4, 2, hidden // 2)}
    model = run_pass(export(Block(), *feeds.values(), names=list(feeds)), PASSES["slim"])[0]
    feeds = {k: v.numpy() for k, v in feeds.items()}
    worker = TpuMlirWorker()
    try:
        def past_v_cosine(m: onnx.ModelProto, name: str) -> float:
            gdir = tmp_path / name
            build_net(worker, gdir, m, [list(x.shape) for x in feeds.values()],
                      ["--quantize", "W4BF16", "--q_group_size", "64", "--quant_input", "--quant_output",
                       "--addr_mode", "io_alone"])
            np.savez(gdir / "in.npz", **feeds)
            worker.call("simulate", "simulate", gdir / "log", bmodel=gdir / f"{name}.bmodel", net=name,
                        inputs=gdir / "in.npz", outputs=gdir / "out.npz")
            got = np.load(gdir / "out.npz")
            want = run(m, feeds)[1]
            return compare(name, "past_v", got[got.files[1]].reshape(want.shape), want).cosine

        assert past_v_cosine(model, "packed") < 0.5  # zeros, or nothing like v
        fixed, sites = run_pass(model, PASSES["packed_projection"])
        assert sites == 1 and past_v_cosine(fixed, "split") > 0.99
    finally:
        worker.close()
