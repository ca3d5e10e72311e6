"""MNN adapter: every graph of an export directory -> `.mnn` with MNNConvert (weight quantization for the
blocks and the head), the chosen graphs checked against onnxruntime on the same inputs (mnn_runtime.py runs
them).

The converter lives in the `mnn` toolchain environment and runs as a subprocess (`mnn_worker.py`); nothing
here imports MNN, so MNN's telemetry, which pip-installs a package when its Python tools are imported,
never runs.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from surgery.checks import DELTA, check_graph, sampled
from surgery.compile.base import QUANTIZATIONS, Adapter, CompileOptions, copy_host_files, finish, prepare
from surgery.compile.logged import parallel, run_logged
from surgery.compile.mnn_runtime import WORKER, MnnModel
from surgery.compile.toolchains import installed, python_of
from surgery.errors import SurgeryError
from surgery.fsutil import STAGING_PREFIX, sha256_file
from surgery.manifest import Compiled, GraphSpec, Manifest
from surgery.parity import Parity

QUANTIZED_KINDS = {"block", "block_cache", "lm_head"}
# cosine floors per output, by weight bits (None: float weights), and for what a block adds to its input
MIN_COSINE = {None: 0.9999, 8: 0.99, 4: 0.95}
MIN_DELTA = {None: 0.999, 8: 0.95, 4: 0.8}


def convert_args(graph: GraphSpec, src: Path, dst: Path, bits: int | None, block: int) -> list[str]:
    args = ["-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(dst), "--bizCode", "surgery"]
    if bits and graph.kind in QUANTIZED_KINDS:
        args += ["--weightQuantBits", str(bits), "--weightQuantBlock", str(block)]
    if graph.kind in ("embedding", "embedding_cache"):
        args += ["--fp16"]  # the table in half precision (weight quantization skips Gather): half the size
    return args


def weight_bits(quantize: str) -> int | None:
    """MNN weight quantization from a `-q` mode: w4* 4-bit, w8* 8-bit, anything else float."""
    return 4 if quantize.startswith("w4") else 8 if quantize.startswith("w8") else None


class MnnAdapter(Adapter):
    name = "mnn"
    chips = ("mnn",)
    summary = "MNN (CPU/GPU/NPU backends of phones and boards): one .mnn per graph"
    toolchain = "mnn"
    backend = "mnn"
    runtime = "surgery.compile.mnn:MnnModel"
    loaded_by = "MNN's Module API (`surgery run`, or MNN.nn.load_module_from_file on the board)"
    quantizations = ("fp32", *QUANTIZATIONS)

    def target(self, chip: str) -> str:
        return "mnn"

    def compile(self, onnx_dir: Path, out: Path, options: CompileOptions, executor: object = None) -> Manifest:
        self.local_only(executor, self.name)
        onnx_dir, out, manifest, owned = prepare(self, onnx_dir, out, options)
        manifest.require_numpy_dtype("surgery compile --chip mnn")
        bits, block, python = weight_bits(options.quantize), options.group_size, python_of("mnn")
        for stale in out.glob(f"{STAGING_PREFIX}*"):  # what a killed run left
            shutil.rmtree(stale, ignore_errors=True)
        owned.add("logs/", *(f"{g.name}.mnn" for g in manifest.graphs))
        logs = out / "logs"

        def convert(graph: GraphSpec) -> GraphSpec:
            dst, tmp, log = out / f"{graph.name}.mnn", out / f".{graph.name}.mnn.tmp", logs / f"{graph.name}.log"
            start = log.stat().st_size if log.is_file() else 0
            # MNNConvert spills every weight of >= 64K elements to `./.__convert_external_data.bin` (a fixed name
            # in its cwd), reads it back and deletes it: concurrent conversions must not share a cwd
            scratch = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{graph.name}-convert-", dir=out))
            try:
                run_logged([str(python), str(WORKER), "convert", *convert_args(graph, onnx_dir / graph.file, tmp,
                                                                                bits, block)],
                           log, f"MNNConvert of graph {graph.name}", cwd=scratch, expect=tmp)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            with open(log, "rb") as fh:
                fh.seek(start)
                if b"Can't open file" in fh.read():  # a lost spill file: the converter still says success
                    tmp.unlink(missing_ok=True)
                    raise SurgeryError(f"MNNConvert of graph {graph.name} lost its weights (see {log})")
            tmp.replace(dst)
            return replace(graph, file=dst.name, sha256=sha256_file(dst), data_file=None, data_sha256=None)

        graphs = parallel(convert, manifest.graphs, options.jobs)
        copy_host_files(onnx_dir, out, manifest)
        compiled = replace(manifest, graphs=graphs, backend="mnn")
        compiled.compiled = Compiled(
            adapter=self.name, chip="mnn", options=vars(options),
            toolchain={"mnn": installed("mnn")["versions"].get("mnn")}, files=[g.file for g in graphs],
            check=options.check, details={
                "weight_quant_bits": bits, "weight_quant_block": block if bits else None,
                "commands": {g.name: ["MNNConvert", *convert_args(g, onnx_dir / g.file, out / f"{g.name}.mnn", bits,
                                                                   block)] for g in manifest.graphs}})
        compiled.write(out)
        rows = check_against_onnx(onnx_dir, out, sampled(manifest, options.check))
        # token indices are compared for the record only: equal logits (ties) may be ordered either way
        return finish(out, compiled, rows, {DELTA: MIN_DELTA[bits]}, MIN_COSINE[bits],
                      f"MNN with {bits or 'float'} weights")


def check_against_onnx(onnx_dir: Path, mnn_dir: Path, graphs: list[GraphSpec]) -> list[Parity]:
    """The chosen .mnn graphs against their ONNX graphs on the same inputs (compile/checks.py)."""
    if not graphs:
        return []
    compiled = MnnModel(mnn_dir)
    try:
        vocab = compiled.manifest.vocab_size
        return [row for g in graphs
                for row in check_graph(onnx_dir, g, vocab, lambda g, feeds: compiled.run(g.name, **feeds))]
    finally:
        compiled.worker.close()


ADAPTER = MnnAdapter()
