"""The weights export reads from a model directory: float as stored, a GPTQ/AWQ checkpoint dequantized,
and a LoRA adapter (if the directory carries one under `lora/`) merged on top.

One entry point, so every reader of a patched directory (export, verify, the MNN engine trace, the host
embedding table) sees the same numbers. `surgery convert --lora` and `surgery apply --lora` link the
adapter into the patched directory's `lora/`, which makes the adapter part of the model being exported.
"""

from __future__ import annotations

from pathlib import Path

from surgery.export.derived import DerivedIndex
from surgery.export.lora import MergedIndex, read_adapter
from surgery.export.quant_config import detect
from surgery.export.quantized import DequantizedIndex
from surgery.export.weights import SafetensorsIndex

LORA_DIR = "lora"


def open_checkpoint(model_dir: Path, config: dict) -> SafetensorsIndex | DerivedIndex:
    """The index export streams from (see the module docstring for the layers)."""
    index: SafetensorsIndex | DerivedIndex = SafetensorsIndex(model_dir)
    quant = detect(model_dir, config)
    if quant is not None:
        index = DequantizedIndex(index, quant)
    if (model_dir / LORA_DIR).is_dir():
        index = MergedIndex(index, read_adapter(model_dir / LORA_DIR))
    return index


def describe(model_dir: Path, config: dict) -> dict:
    """What the checkpoint is, for the manifest and the report: its quantization and its adapter, if any."""
    quant = detect(model_dir, config)
    lora = model_dir / LORA_DIR
    return {"quantization": quant.as_dict() | {"summary": quant.describe()} if quant else None,
            "lora": read_adapter(lora).summary() if lora.is_dir() else None}
