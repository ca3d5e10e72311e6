"""The weights export reads from a model directory: float as stored, a GPTQ/AWQ checkpoint dequantized,
and a LoRA adapter (if the directory carries one under `lora/`) merged on top.

One entry point, so every reader of a patched directory (export, verify, the MNN engine trace, the host
embedding table) sees the same numbers. `surgery convert --lora` and `surgery apply --lora` link the
adapter into the patched directory's `lora/`, which makes the adapter part of the model being exported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.export.derived import DerivedIndex
from surgery.export.lora import CONFIG, WEIGHTS, MergedIndex, read_adapter
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


def check_lora(adapter: Path | None, mode: str) -> dict | None:
    """Refuse a bad adapter or mode before any stage runs; return the adapter's fingerprint (so a changed
    adapter re-runs the stages that read it), or None without one."""
    if mode not in ("merged", "separate"):
        raise SurgeryError(f"--lora-mode {mode!r}: choose merged or separate")
    if adapter is None:
        return None
    read_adapter(adapter)  # whether the target can load it separately is the compile adapter's to say
    stats = {name: (adapter / name).stat() for name in (CONFIG, WEIGHTS)}
    return {name: [st.st_size, int(st.st_mtime)] for name, st in stats.items()}


def attach_lora(model_dir: Path, adapter: Path) -> None:
    """Link the adapter into `model_dir/lora/`, making it part of the model every later stage reads."""
    read_adapter(adapter)
    dst = model_dir / LORA_DIR
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    for name in (CONFIG, WEIGHTS):
        (dst / name).symlink_to((adapter / name).resolve())
