"""`surgery run` on a Sophgo bundle: the combined bmodel driven through TPU-MLIR's runtime library on the CPU
simulator, by net name, with the KV history in the cache nets' input buffers (compile/bmodel_driver.py runs
inside a TPU-MLIR worker). Greedy uses the bmodel's `greedy_head`; sampling its `sample_head`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from surgery.compile.tpumlir import TpuMlirWorker
from surgery.errors import SurgeryError
from surgery.runtime import Generation, Runtime, Sampling


class SophgoModel(Runtime):
    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        self.bmodel = (self.dir / self.manifest.graphs[0].file).absolute()
        self.worker = TpuMlirWorker()
        self.scratch = Path(tempfile.mkdtemp(prefix="surgery-sophgo-run-"))

    def run(self, name: str, **feeds):
        raise SurgeryError("a Sophgo bundle runs whole generations on the simulator; use generate()")

    def generate(self, prompt: list[int], max_new_tokens: int, eos: set[int] | None = None,
                 sampling: Sampling | None = None) -> Generation:
        seq = self.manifest.seq_length
        if not 0 < len(prompt) < seq:
            raise SurgeryError(f"the prompt has {len(prompt)} tokens; this bundle takes 1 to {seq - 1}")
        result = self.scratch / "generation.json"
        self.worker.call("generate", "generation on the simulator", self.scratch / "run.log", bmodel=self.bmodel,
                         prompt=list(prompt), max_new_tokens=max_new_tokens, eos=sorted(eos or []),
                         sampling=None if sampling is None else vars(sampling),
                         seed=0 if sampling is None else sampling.seed, result=result)
        data = json.loads(result.read_text())
        return Generation(data["tokens"], data["prefill_ms"], data["decode_tokens_per_s"])

    def __del__(self) -> None:
        if hasattr(self, "worker"):
            self.worker.close()
        if hasattr(self, "scratch"):
            shutil.rmtree(self.scratch, ignore_errors=True)
