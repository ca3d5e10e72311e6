"""A GPTQ or AWQ checkpoint read as the float checkpoint it stands for.

Every Linear the checkpoint stores as `<module>.qweight` (+ qzeros, scales, and for GPTQ g_idx) reads as
`<module>.weight`, dequantized exactly (export/dequant.py), one module at a time as export asks for it;
everything else (norms, embeddings, biases, an unquantized head) reads as stored. So the streaming export,
its verification and the MNN engine trace all see the checkpoint's own numbers with no whole-model load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.errors import SurgeryError
from surgery.export.dequant import awq_weight, gptq_weight
from surgery.export.derived import DerivedIndex
from surgery.export.quant_config import SourceQuant
from surgery.export.weights import SafetensorsIndex

PACKED = ".qweight"


class DequantizedIndex(DerivedIndex):
    """`<module>.weight` for every packed Linear, dequantized on read."""

    def __init__(self, base: SafetensorsIndex, quant: SourceQuant) -> None:
        super().__init__(base)
        self.quant = quant
        self.modules = sorted(name[: -len(PACKED)] for name in base.files if name.endswith(PACKED))
        if not self.modules:
            raise SurgeryError(f"{quant.source} declares {quant.method} quantization but the weights hold no "
                               f"*{PACKED} tensor; the checkpoint does not match its config")
        needed = ("qzeros", "scales")
        for module in self.modules:
            missing = [part for part in needed if f"{module}.{part}" not in base.files]
            if missing:
                raise SurgeryError(f"{module}.{missing[0]} is missing from the weights; a {quant.method} "
                                   "Linear needs qweight, qzeros and scales")
        self.derived = {f"{module}.weight" for module in self.modules}

    def source_file(self, name: str) -> Path:
        return self.base.files[name[: -len(".weight")] + PACKED]

    def derived_shape(self, name: str) -> list[int]:
        """[out, in] from qweight's shape alone: GPTQ packs inputs into its rows, AWQ outputs into columns."""
        rows, cols = self.base.shape(name[: -len(".weight")] + PACKED)
        per = 32 // self.quant.bits
        return [cols * per, rows] if self.quant.method == "awq" else [cols, rows * per]

    def derive(self, name: str) -> torch.Tensor:
        module = name[: -len(".weight")]
        parts = ["qweight", "qzeros", "scales"] + (["g_idx"] if f"{module}.g_idx" in self.base.files else [])
        t = self.base.read(f"{module}.{p}" for p in parts)
        qweight, qzeros, scales = (t[f"{module}.{p}"] for p in parts[:3])
        if self.quant.method == "awq":
            return awq_weight(self.quant, module, qweight, qzeros, scales)
        return gptq_weight(self.quant, module, qweight, qzeros, scales, t.get(f"{module}.g_idx"))
