"""Running `.mnn` graphs from our process: one `mnn_worker.py serve` subprocess in the MNN toolchain's
environment holds the loaded modules; requests go over pipes as length-prefixed frames (JSON header, then
`.npy` payloads). `MnnModel` is the Runtime `surgery run` uses for a `compile --chip mnn` directory.
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
from surgery.runtime import Runtime

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
