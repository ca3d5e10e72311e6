"""Known vendor-compiler problems, as data: which compiler and versions, the symptom, and the pass that
avoids it. Only problems we measured or that the toolchain notes record are listed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workaround:
    id: str
    compiler: str
    versions: str
    symptom: str
    avoided_by: str  # a pass name
    source: str


WORKAROUNDS = [
    Workaround("tpu-mlir-opset18-reducemean", "tpu-mlir", "1.30.2 (measured); no fixed version known",
               'model_transform fails: "Unsupport opset for ReduceMean" on opset >= 18 graphs',
               "opset17", "shared/notes/toolchains.md"),
    Workaround("half-precision-mask-overflow", "any fp16/bf16 backend (TPU-MLIR F16/BF16, MNN fp16)", "all",
               "NaN or garbage tokens: finfo(float32).min mask constants overflow half precision",
               "mask_constant", "shared/notes/anchors.md (mask constant -10000)"),
    Workaround("tpu-mlir-or-constant", "tpu-mlir", "1.30.2 (measured)",
               "model_transform fails: \"operand /Constant_..._output_0 not found\" for an Or with a constant "
               "operand", "export: penalty_sample_head uses a float min-keep multiplier, not a boolean Or",
               "measured on the fixture's penalty_sample_head"),
]
