"""MNN adapter: every graph of an export directory -> `.mnn` with MNNConvert (weight quantization for the
blocks and the head), each checked against onnxruntime on the same inputs, and a runtime that runs them.

The converter and the runtime live in the `mnn` toolchain environment and run as subprocesses
(`mnn_worker.py`); nothing here imports MNN, so MNN's telemetry, which pip-installs a package when its
Python tools are imported, never runs.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from surgery.checks import DELTA, check_graph, sampled
from surgery.compile.commands import parallel, run_logged
from surgery.compile.toolchains import installed, python_of
from surgery.errors import SurgeryError
from surgery.fsutil import STAGING_PREFIX, sha256_file
from surgery.manifest import GraphSpec, Manifest
from surgery.outputs import claim
from surgery.parity import Parity
from surgery.runtime import Runtime

WORKER = Path(__file__).with_name("mnn_worker.py")
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


class MnnWorker:
    """One `mnn_worker.py serve` process holding loaded modules; requests over pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(python_of("mnn")), str(WORKER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _send(self, payload: bytes) -> None:
        self.proc.stdin.write(struct.pack("<I", len(payload)) + payload)

    def _recv(self) -> bytes:
        (n,) = struct.unpack("<I", self.proc.stdout.read(4))
        return self.proc.stdout.read(n)

    def _reply(self) -> list[np.ndarray]:
        header = json.loads(self._recv())
        if not header["ok"]:
            raise SurgeryError(f"MNN runtime error: {header['error']}")
        return [np.load(io.BytesIO(self._recv())) for _ in range(header["count"])]

    def load(self, name: str, path: Path, inputs: list[str], outputs: list[str]) -> None:
        self._send(json.dumps({"op": "load", "name": name, "path": str(path), "inputs": inputs,
                               "outputs": outputs}).encode())
        self.proc.stdin.flush()
        self._reply()

    def run(self, name: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        self._send(json.dumps({"op": "run", "name": name}).encode())
        for array in arrays:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(array))
            self._send(buf.getvalue())
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)


class MnnModel(Runtime):
    """A `surgery compile --chip mnn` directory on the MNN runtime, with the shared generation loop."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self.worker = MnnWorker()
        self.inputs: dict[str, list[str]] = {}  # graphs loaded so far (on first use)

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        if name not in self.inputs:
            g = self.manifest.graph(name)
            self.worker.load(g.name, self.dir / g.file, [t.name for t in g.inputs], [t.name for t in g.outputs])
            self.inputs[name] = [t.name for t in g.inputs]
        return self.worker.run(name, [feeds[n] for n in self.inputs[name]])

    def __del__(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()


def compile_mnn(onnx_dir: Path, out: Path, bits: int | None = None, block: int = 64, jobs: int = 2,
                check: str = "sample") -> Manifest:
    onnx_dir, out = Path(onnx_dir).absolute(), Path(out).absolute()  # tools run in other cwds
    manifest = Manifest.read(onnx_dir)
    if manifest.backend != "onnxruntime":
        raise SurgeryError(f"{onnx_dir} is not an export directory (backend {manifest.backend}); "
                           "compile the output of `surgery export` or `surgery optimize`")
    manifest.require_numpy_dtype("surgery compile --chip mnn")
    python = python_of("mnn")
    owned = claim(out, "compile", {"export": onnx_dir})
    for stale in out.glob(f"{STAGING_PREFIX}*"):  # what a killed run left
        shutil.rmtree(stale, ignore_errors=True)
    owned.add("logs/", "manifest.json", *(f"{g.name}.mnn" for g in manifest.graphs), *manifest.tokenizer_files,
              *([manifest.embedding_file["file"]] if manifest.embedding_file else []))
    logs = out / "logs"

    def convert(graph: GraphSpec) -> GraphSpec:
        dst = out / f"{graph.name}.mnn"
        tmp = out / f".{graph.name}.mnn.tmp"
        log = logs / f"{graph.name}.log"
        start = log.stat().st_size if log.is_file() else 0
        # MNNConvert spills every weight of >= 64K elements to `./.__convert_external_data.bin` (a fixed name in
        # its cwd), reads it back and deletes it: concurrent conversions must not share a cwd
        scratch = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{graph.name}-convert-", dir=out))
        try:
            run_logged([str(python), str(WORKER), "convert", *convert_args(graph, onnx_dir / graph.file, tmp, bits,
                                                                            block)],
                       log, f"MNNConvert of graph {graph.name}", cwd=scratch, expect=tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        with open(log, "rb") as fh:
            fh.seek(start)
            if b"Can't open file" in fh.read():  # a lost spill file: the converter still says success
                tmp.unlink(missing_ok=True)
                raise SurgeryError(f"MNNConvert of graph {graph.name} lost its weights (see {log})")
        tmp.replace(dst)
        return replace(graph, file=dst.name, sha256=sha256_file(dst), data_file=None)

    graphs = parallel(convert, manifest.graphs, jobs)
    for name in [*manifest.tokenizer_files, *([manifest.embedding_file["file"]] if manifest.embedding_file else [])]:
        shutil.copyfile(onnx_dir / name, out / name)
    compiled = replace(manifest, graphs=graphs, backend="mnn")
    compiled.compiled = {"chip": "mnn", "weight_quant_bits": bits, "weight_quant_block": block if bits else None,
                         "toolchain": installed("mnn")["versions"].get("mnn"), "source": str(onnx_dir.resolve()),
                         "commands": {g.name: ["MNNConvert", *convert_args(g, onnx_dir / g.file, out / f"{g.name}.mnn",
                                                                          bits, block)]
                                      for g in manifest.graphs},
                         "parity": []}
    compiled.write(out)
    rows = check_against_onnx(onnx_dir, out, sampled(manifest, check))
    compiled.compiled["parity"] = [r.as_dict() for r in rows]
    compiled.compiled["check"] = check
    compiled.write(out)
    floors = {DELTA: MIN_DELTA.get(bits, 0.8)}
    # token indices are compared for the record only: equal logits (ties) may be ordered either way
    bad = [r for r in rows if not r.cosine >= floors.get(r.output, MIN_COSINE.get(bits, 0.95))
           and r.output not in ("token", "tokens")]
    if bad:
        raise SurgeryError(f"MNN graph {bad[0].graph} output {bad[0].output} has cosine {bad[0].cosine:.5f} "
                           f"against onnxruntime (floor {floors.get(bad[0].output, MIN_COSINE.get(bits, 0.95))} "
                           f"for {bits or 'float'} weights)")
    return compiled


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
