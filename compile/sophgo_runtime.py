"""`surgery run` on a Sophgo bundle: the combined bmodel driven through TPU-MLIR's runtime library on the CPU
simulator, by net name, with the KV history in the cache nets' input buffers (compile/bmodel_driver.py runs
inside a TPU-MLIR worker). Greedy uses the bmodel's `greedy_head`; sampling its `sample_head`.

VL bundles: `run("vision", pixel_values=...)` runs the bundle's compiled `vision` net on the simulator (the
host preprocessing and placement are surgery/vision_input.py's, as for the ONNX reference), and
`generate(..., media=...)` hands its rows, their prompt slots and the multimodal-RoPE positions to the driver,
which writes them over the embedding output before the first block."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from surgery.compile.tpumlir import TpuMlirWorker
from surgery.errors import SurgeryError
from surgery.runtime import Generation, Runtime, Sampling

if TYPE_CHECKING:
    from surgery.vision_input import Media


class SophgoModel(Runtime):
    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self.bmodel = (self.dir / self.manifest.graphs[0].file).absolute()
        self.worker = TpuMlirWorker()
        self.scratch = Path(tempfile.mkdtemp(prefix="surgery-sophgo-run-"))

    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        """One net of the combined bmodel on the simulator: only the vision tower runs alone (the LLM's nets
        run as whole generations, with their KV buffers, in generate())."""
        vision = self.manifest.vision
        if vision is None or name != vision["graph"]:
            raise SurgeryError("a Sophgo bundle runs whole generations on the simulator; use generate()")
        graph = self.manifest.graph(name)
        np.savez(self.scratch / "net_in.npz", **feeds)
        self.worker.call("simulate", f"the {name} net on the simulator", self.scratch / "run.log", bmodel=self.bmodel,
                         net=name, inputs=self.scratch / "net_in.npz", outputs=self.scratch / "net_out.npz")
        got = np.load(self.scratch / "net_out.npz")  # TPU-MLIR may suffix output names; it keeps their order
        names = [next((k for k in got.files if k == t.name or k.startswith(f"{t.name}_")), got.files[i])
                 for i, t in enumerate(graph.outputs)]
        return [got[k] for k in names]

    def generate(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None,
                 sampling: Sampling | None = None, media: Media | None = None) -> Generation:
        seq = self.manifest.seq_length
        if not 0 < len(prompt) < seq:
            raise SurgeryError(f"the prompt has {len(prompt)} tokens; this bundle takes 1 to {seq - 1}")
        if media is not None and self.manifest.vision is None:
            raise SurgeryError(f"{self.dir} is not a vision-language bundle; it cannot take an image")
        extra = {}
        if media is not None:
            extra["media"] = self.scratch / "media.npz"
            arrays = {"embeds": np.asarray(media.embeds, np.float32), "slots": media.slots,
                      "positions": media.positions, "delta": np.int64(media.delta)}
            np.savez(extra["media"], **{k: v for k, v in arrays.items() if v is not None})
        result = self.scratch / "generation.json"
        self.worker.call("generate", "generation on the simulator", self.scratch / "run.log", bmodel=self.bmodel,
                         prompt=list(prompt), max_new_tokens=max_new_tokens, eos=sorted(eos or []),
                         sampling=None if sampling is None else vars(sampling),
                         seed=0 if sampling is None else sampling.seed, result=result, **extra)
        data = json.loads(result.read_text())
        return Generation(data["tokens"], data["prefill_ms"], data["decode_tokens_per_s"])

    def __del__(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()
        if hasattr(self, "scratch"):
            shutil.rmtree(self.scratch, ignore_errors=True)
