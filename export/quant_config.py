"""What quantization a checkpoint was saved with (GPTQ or AWQ), read from its configuration files.

A pre-quantized checkpoint stores integer codes plus scales in place of a Linear's float `weight`; export
streams float weights, so it must know the packing before it can turn the codes back into floats. This
module only reads and checks the declaration; `export/dequant.py` does the arithmetic. Anything we cannot
dequantize exactly is refused here, in one line naming the field, before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.errors import SurgeryError

BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 stores every zero point minus one; v2 stores it as is
AWQ_VERSIONS = ("gemm",)  # GEMV / Marlin / exllama packings order the codes differently


@dataclass(frozen=True)
class SourceQuant:
    """The declared quantization of a checkpoint, normalized across the two config file spellings."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per output channel (the whole input row)
    sym: bool
    desc_act: bool  # GPTQ act-order: input channels are grouped by g_idx, not by position
    packing: str  # "gptq" | "gptq_v2" | "gemm"
    source: str  # the file that declared it

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point: GPTQ v1 writes `zero - 1` (an AutoGPTQ convention kept for
        compatibility), v2 and AWQ write the zero itself."""
        return 1 if self.packing == "gptq" else 0

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        group = "per channel" if self.group_size <= 0 else f"group {self.group_size}"
        extra = ", act-order" if self.desc_act else ""
        return (f"{self.method.upper()} int{self.bits}, {group}, {'sym' if self.sym else 'asym'}{extra} "
                f"({self.packing} packing)")


def declared(model_dir: Path, config: dict) -> tuple[dict, str] | None:
    """The raw quantization declaration and where it came from, or None for a float checkpoint."""
    if isinstance(config.get("quantization_config"), dict):
        return config["quantization_config"], "config.json quantization_config"
    for name in ("quantize_config.json", "quant_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                return json.loads(path.read_text()), name
            except json.JSONDecodeError as exc:
                raise SurgeryError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return None


def detect(model_dir: Path, config: dict) -> SourceQuant | None:
    """The checkpoint's quantization, or None when it is float; refuses what cannot be read exactly."""
    found = declared(model_dir, config)
    if found is None:
        return None
    raw, where = found
    method = str(raw.get("quant_method") or _guess_method(raw)).lower()
    if method == "gptq":
        return _gptq(raw, where)
    if method == "awq":
        return _awq(raw, where)
    raise SurgeryError(f"{where}: quant_method {raw.get('quant_method')!r} is not supported; surgery reads "
                       "gptq and awq checkpoints (or a float one)")


def _guess_method(raw: dict) -> str:
    """AutoAWQ's quant_config.json says w_bit / zero_point, AutoGPTQ's quantize_config.json says desc_act /
    bits; neither names the method."""
    if "w_bit" in raw or "zero_point" in raw:
        return "awq"
    return "gptq" if "desc_act" in raw or "bits" in raw else ""


def _bits(raw: dict, where: str) -> int:
    bits = raw.get("bits", raw.get("w_bit"))
    if bits not in BITS:
        raise SurgeryError(f"{where}: bits {bits!r} is not supported; surgery reads {' and '.join(map(str, BITS))}-bit "
                           "checkpoints")
    return int(bits)


def _group(raw: dict, where: str) -> int:
    group = raw.get("group_size", raw.get("q_group_size", -1))
    if not isinstance(group, int) or group == 0 or group < -1:
        raise SurgeryError(f"{where}: group_size {group!r} must be a positive integer or -1 (per channel)")
    return group


def _gptq(raw: dict, where: str) -> SourceQuant:
    bits = _bits(raw, where)
    packing = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
    if packing not in GPTQ_FORMATS:
        raise SurgeryError(f"{where}: checkpoint_format {packing!r} is not supported; surgery reads "
                           f"{', '.join(GPTQ_FORMATS)} (re-save the model in gptq format)")
    return SourceQuant("gptq", bits, _group(raw, where), bool(raw.get("sym", True)), bool(raw.get("desc_act")),
                       packing, where)


def _awq(raw: dict, where: str) -> SourceQuant:
    bits = _bits(raw, where)
    version = str(raw.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise SurgeryError(f"{where}: version {raw.get('version')!r} is not supported; surgery reads AWQ's "
                           f"{', '.join(AWQ_VERSIONS)} packing")
    if bits != 4:
        raise SurgeryError(f"{where}: bits {bits} is not supported for AWQ; its GEMM packing is 4-bit")
    if raw.get("zero_point", True) is not True:
        raise SurgeryError(f"{where}: zero_point {raw.get('zero_point')!r} is not supported; surgery reads AWQ "
                           "checkpoints with zero points")
    group = _group(raw, where)
    if group <= 0:
        raise SurgeryError(f"{where}: group_size {group} is not supported for AWQ; it needs a positive group")
    return SourceQuant("awq", bits, group, False, False, "gemm", where)


def float_config(config: dict) -> dict:
    """config.json without its quantization declaration: the skeleton is then built as a float model, with
    no transformers quantizer (which would need GPU kernels and replace every Linear)."""
    return {k: v for k, v in config.items() if k != "quantization_config"}
