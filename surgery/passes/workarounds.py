"""Known vendor-compiler problems, as data: which compiler and versions, the symptom, and what avoids it (a
pass of this package, or a choice made at export). Only problems we reproduced are listed; `evidence` names
the test in this repository that shows each one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workaround:
    id: str
    compiler: str
    versions: str
    symptom: str
    avoided_by: str | None  # a pass name (checked by a test), or None when export avoids it
    evidence: str  # the test in this repository that reproduces or guards it
    note: str = ""


WORKAROUNDS = [
    Workaround("tpu-mlir-opset18-reducemean", "tpu-mlir", "1.30.2 (measured); no fixed version known",
               'model_transform fails: "Unsupport opset for ReduceMean" on opset >= 18 graphs',
               "opset17", "tests/test_compile_sophgo.py::test_workaround_opset18_reducemean_reproduced_and_avoided"),
    Workaround("tpu-mlir-argmax-length", "tpu-mlir", "1.30.2 (measured)",
               "model_deploy fails in codegen (nodechip_arg_parallel.c mem_check) for an ArgMax over some "
               "vocabulary sizes (32001, MiniCPM-2B's 122753)", "argmax_pad",
               "tests/test_compile_sophgo.py::test_workaround_argmax_vocabulary_reproduced_and_avoided"),
    Workaround("tpu-mlir-io-alone-window", "tpu-mlir", "1.30.2 (measured)",
               "a decode block deployed with --quant_output and --addr_mode io_alone returns zeros for an output "
               "that is an in-place window into a packed projection (Baichuan2-7B's past_v: cosine 0.0)",
               "packed_projection",
               "tests/test_compile_sophgo.py::test_workaround_packed_projection_window_reproduced_and_avoided"),
    Workaround("half-precision-mask-overflow", "any fp16/bf16 backend (TPU-MLIR F16/BF16, MNN fp16)", "all",
               "NaN or garbage tokens: finfo(float32).min mask constants overflow half precision",
               "mask_constant", "surgery/passes/mask_constant_test.py"),
    Workaround("tpu-mlir-or-constant", "tpu-mlir", "1.30.2 (measured)",
               "model_transform fails: \"operand /Constant_..._output_0 not found\" for an Or with a constant "
               "operand", None, "tests/test_compile_sophgo.py::test_bm1684x_compile_on_the_simulator (all graphs)",
               "export/blocks.py: SampleHead keeps min-keep as a float multiplier, not a boolean Or"),
]
