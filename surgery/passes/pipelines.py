"""Per-target pass pipelines: the order each compiler wants, as data."""

from __future__ import annotations

CLEANUP = ["slim", "rope_tables", "transpose_pairs", "cast_pairs"]
OPSET17 = ["opset17", *CLEANUP, "rotate_half", "rmsnorm17", "mask_constant", "int32_inputs", "slim"]
# TPU-MLIR: no rotate_half. Its +-1 matrix becomes a weight that W4/W8 modes quantize, and one the compiler
# places differently in a layer's prefill and decode nets, so their weights stop being byte-identical and
# `model_tool --combine` stores each layer twice (measured: 1.11x llm_convert's device memory, 1.00x without).
TPU_MLIR = ["opset17", *CLEANUP, "packed_projection", "rmsnorm17", "mask_constant", "int32_inputs", "argmax_pad",
            "slim"]

# LLM-TPU's layout: the final norm at the end of the last layer's blocks, lm_head a bare table product
LLM_TPU = {"final_norm": "last_block"}

TARGETS: dict[str, dict] = {
    "generic": {"summary": "onnxruntime and compilers that take opset 23 (RMSNormalization)",
                "passes": [*CLEANUP, "rotate_half", "gqa_grouped", "rmsnorm", "slim"]},
    "bm1684x": {"summary": "Sophgo BM1684X through TPU-MLIR (opset 17)", "passes": TPU_MLIR, **LLM_TPU},
    "bm1688": {"summary": "Sophgo BM1688 through TPU-MLIR (opset 17)", "passes": TPU_MLIR, **LLM_TPU},
    "cv186ah": {"summary": "Sophgo CV186AH through TPU-MLIR (opset 17)", "passes": TPU_MLIR, **LLM_TPU},
    "mnn": {"summary": "MNN (MNNConvert fuses attention itself)", "passes": [*CLEANUP, "rotate_half", "rmsnorm17",
                                                                              "mask_constant", "slim"]},
    "ax650": {"summary": "Axera AX650 through Pulsar2 (opset 17)", "passes": OPSET17},
    "ax630c": {"summary": "Axera AX630C through Pulsar2 (opset 17)", "passes": OPSET17},
}
