"""A PEFT LoRA adapter merged into the weights as export streams them.

An adapter directory holds adapter_config.json and adapter_model.safetensors with, per adapted Linear,
`base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`. Merging computes
`W + (B @ A) * scale` with scale = lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA (PEFT's rule,
with its alpha_pattern overrides), per module when export reads that module's weight. What the merge cannot
express (DoRA, trained biases, embedding adapters, fully retrained modules) is refused by field name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from surgery.errors import SurgeryError
from surgery.export.derived import DerivedIndex

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class Adapter:
    """The adapter's tensors by module and each module's merge scale."""

    path: Path
    config: dict
    modules: dict[str, tuple[str, str]]  # module -> (lora_A key, lora_B key)
    scales: dict[str, float]

    def summary(self) -> dict:
        return {"adapter": str((self.path / CONFIG).resolve().parent),  # the user's directory, not our link
                "r": self.config.get("r"), "lora_alpha": self.config.get("lora_alpha"),
                "use_rslora": bool(self.config.get("use_rslora")), "modules": len(self.modules),
                "target_modules": self.config.get("target_modules")}


def read_adapter(path: Path) -> Adapter:
    """Check an adapter directory and index its tensors (nothing large is loaded)."""
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise SurgeryError(f"--lora {path} must hold {CONFIG} and {WEIGHTS} (a PEFT adapter directory)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise SurgeryError(f"{path / CONFIG} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    _refuse_unmergeable(config)
    pairs: dict[str, dict[str, str]] = {}
    with safe_open(str(path / WEIGHTS), framework="pt") as handle:
        keys = list(handle.keys())
    for key in keys:
        match = KEY.match(key)
        if match is None:
            raise SurgeryError(f"{WEIGHTS}: tensor {key} is not a lora_A/lora_B weight; only Linear LoRA "
                               "adapters can be merged (no embedding adapters, no modules_to_save)")
        pairs.setdefault(match["module"], {})[match["ab"]] = key
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise SurgeryError(f"{WEIGHTS}: {module} has lora_{next(iter(ab))} but not its pair")
        modules[module] = (ab["A"], ab["B"])
    if not modules:
        raise SurgeryError(f"{path / WEIGHTS} holds no LoRA tensors")
    with safe_open(str(path / WEIGHTS), framework="pt") as handle:
        ranks = {m: handle.get_slice(a).get_shape()[0] for m, (a, _) in modules.items()}
    return Adapter(path, config, modules, {m: scale(config, m, r) for m, r in ranks.items()})


def _refuse_unmergeable(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise SurgeryError(f"{CONFIG}: peft_type {config.get('peft_type')!r} is not supported; surgery merges LORA")
    if config.get("use_dora"):
        raise SurgeryError(f"{CONFIG}: use_dora true is not supported; DoRA rescales the merged weight per column")
    if config.get("fan_in_fan_out"):
        raise SurgeryError(f"{CONFIG}: fan_in_fan_out true is not supported (Conv1D-style weights)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise SurgeryError(f"{CONFIG}: bias {config.get('bias')!r} is not supported; merge adapters without "
                           "trained biases")
    if config.get("modules_to_save"):
        raise SurgeryError(f"{CONFIG}: modules_to_save {config['modules_to_save']!r} is not supported; those "
                           "modules are replaced whole, not adapted")
    if not isinstance(config.get("lora_alpha"), int | float) or not isinstance(config.get("r"), int):
        raise SurgeryError(f"{CONFIG}: r and lora_alpha must be numbers")


def scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha (alpha_pattern's, if a key matches the module name) over r, or
    over sqrt(r) with use_rslora; r is the rank the tensors have (rank_pattern already shaped them)."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


class MergedIndex(DerivedIndex):
    """`<module>.weight` of every adapted Linear read as W + (B @ A) * scale."""

    def __init__(self, base, adapter: Adapter) -> None:
        super().__init__(base)
        self.adapter = adapter
        for module in adapter.modules:
            if f"{module}.weight" not in base.files:
                raise SurgeryError(f"the adapter targets {module}, which the model has no weight for; was it "
                                   "trained on this base model?")
        self.derived = {f"{module}.weight" for module in adapter.modules}

    def derived_shape(self, name: str) -> list[int]:
        return self.base.shape(name)

    def derive(self, name: str) -> torch.Tensor:
        module = name[: -len(".weight")]
        weight = self.base.read([name])[name]
        a_key, b_key = self.adapter.modules[module]
        with safe_open(str(self.adapter.path / WEIGHTS), framework="pt") as handle:
            a, b = handle.get_tensor(a_key).float(), handle.get_tensor(b_key).float()
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            raise SurgeryError(f"{module}: lora_B @ lora_A is {b.shape[0]}x{a.shape[1]} but the weight is "
                               f"{weight.shape[0]}x{weight.shape[1]}; the adapter belongs to another model")
        return weight.float() + (b @ a) * self.adapter.scales[module]
