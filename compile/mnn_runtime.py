"""Running MNN output from our process. Per-graph `.mnn` files: one `mnn_worker.py serve` subprocess in the
MNN toolchain's environment holds the loaded modules; requests go over pipes as length-prefixed frames (JSON
header, then `.npy` payloads); `MnnModel` runs them with the shared generation loop. MNN's LLM engine layout:
`MnnLlm` hands the directory to the engine itself. `open_mnn` picks one for `surgery run`.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
from pathlib import Path

import numpy as np

from surgery.compile.toolchains import python_of
from surgery.errors import SurgeryError
from surgery.runtime import Generation, Runtime

WORKER = Path(__file__).with_name("mnn_worker.py")


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


class MnnLlm:
    """A directory in MNN's LLM engine layout (compile/mnn_llm.py), run by MNN's own engine: `MNN.llm` in
    the toolchain's environment (`mnn_worker.py generate`), one process per generation. Greedy only: the
    engine's samplers are configured in config.json, not per call."""

    def __init__(self, directory: str | Path) -> None:
        from surgery.manifest import Manifest

        self.dir = Path(directory)
        self.manifest = Manifest.read(self.dir)

    def engine(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None,
               lora: str | None = None) -> dict:
        """Tokens, the prefill logits and timings from `MNN.llm.create(config.json)`; with `lora` (a file
        of the directory, `lora.mnn`), from the adapter's model the engine loads over that base."""
        import subprocess

        args = [str(python_of("mnn")), str(WORKER), "generate", str(self.dir / "config.json"),
                ",".join(map(str, prompt)), str(max_new_tokens), ",".join(map(str, sorted(eos or ()))), lora or ""]
        done = subprocess.run(args, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            tail = "\n".join(done.stderr.strip().splitlines()[-20:])
            raise SurgeryError(f"MNN's LLM engine failed on {self.dir} (exit {done.returncode}):\n{tail}")
        return json.loads(lines[-1])

    def generate(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None,
                 sampling: object = None, lora: str | None = None) -> Generation:
        if sampling is not None:
            raise SurgeryError("MNN's engine samples as its config.json says (sampler_type); `surgery run --sample` "
                               "drives the per-graph layout (compile with --layout graphs)")
        if not prompt:
            raise SurgeryError("the prompt is empty")
        result = self.engine(prompt, max_new_tokens, eos, lora)
        steps = result["steps"]
        return Generation(result["tokens"], result["prefill_ms"], len(steps) / sum(steps) if steps else 0.0, steps)


def open_mnn(directory: str | Path) -> MnnModel | MnnLlm:
    """The runtime for a `compile --chip mnn` directory: MNN's LLM engine for its layout, else our graphs."""
    from surgery.manifest import Manifest

    manifest = Manifest.read(Path(directory))
    return MnnLlm(directory) if manifest.contract == "engine" else MnnModel(directory)
