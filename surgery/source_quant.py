"""`-q` and `-g` for `surgery convert` when the input is already quantized, and what the report says
about the source checkpoint.

A GPTQ/AWQ checkpoint's calibration is what its user paid for: the compiler should keep its bit width and
use groups no coarser than the checkpoint's, so convert takes both from the checkpoint when they are not
given, and refuses an explicit choice that contradicts it (one line, naming the option) rather than
silently deploying something the user did not ask for.
"""

from __future__ import annotations

from pathlib import Path

from surgery.compile.base import CompileOptions
from surgery.errors import SurgeryError
from surgery.export.quant_config import SourceQuant
from surgery.requantize import measure, weight_bits

DEFAULT_QUANTIZE, DEFAULT_GROUP = "w4bf16", 64


def resolve(quantize: str | None, group: int | None, quant: SourceQuant | None) -> tuple[str, int]:
    """The `-q` and `-g` to compile with: as given, else from the checkpoint, else the defaults."""
    if quant is None:
        return (DEFAULT_QUANTIZE if quantize is None else quantize), (DEFAULT_GROUP if group is None else group)
    if quantize is None:
        quantize = f"w{quant.bits}bf16"
    elif weight_bits(quantize) != quant.bits:
        raise SurgeryError(f"-q {quantize} contradicts the checkpoint, which is {quant.method.upper()} "
                           f"int{quant.bits} ({quant.source}); use -q w{quant.bits}bf16 or w{quant.bits}f16, or "
                           "leave -q out")
    if group is None:
        return quantize, quant.group_size if quant.group_size > 0 else DEFAULT_GROUP
    if quant.group_size > 0 and quant.group_size % group:
        raise SurgeryError(f"-g {group} contradicts the checkpoint's group_size {quant.group_size} "
                           f"({quant.source}); use a divisor of it, or leave -g out")
    return quantize, group


def source_summary(model_dir: Path, config: dict, adapter: str, options: CompileOptions,
                   kept: list[str] = ()) -> dict:
    """The checkpoint's quantization and adapter, and (for a quantized one) whether and how much the
    compiler's second quantization changes its weights; `kept`: the Linears the compiler was handed as the
    checkpoint's own codes (compile/mnn_codes.py), which are not re-quantized."""
    from surgery.export.act_order import RegroupedIndex, dequantized, plan
    from surgery.export.checkpoint import describe, open_checkpoint

    summary = describe(model_dir, config)
    if options.lora:  # --lora-mode separate: not in the patched model, shipped beside it
        from surgery.export.lora import read_adapter

        summary["lora"] = read_adapter(Path(options.lora)).summary() | {"mode": "separate"}
    if summary["quantization"] is None:
        return summary
    index = open_checkpoint(model_dir, config)
    inner = dequantized(index)
    regroup = plan(index)  # act-order: the compiler is handed the columns sorted by group (export/act_order.py)
    index = RegroupedIndex(index, regroup) if regroup else index
    if adapter == "sophgo" and not kept:
        kept = on_grid(index, inner.modules, options)
    requantized = [m for m in inner.modules if m not in set(kept)]
    how = f"{adapter} stores every quantized Linear with the checkpoint's own codes"
    if adapter == "sophgo":
        how = ("TPU-MLIR is handed every quantized Linear as codes (top.A16MatMul, compile/tpumlir_codes.py)"
               + ("; under -q w*bf16 its lowering stores each group's scale in bf16" if "bf16" in options.quantize
                  else ""))
    compiler = measure(index, requantized, adapter, options) if requantized else {"requantizes": False, "how": how}
    return summary | {"compiler": compiler | {"kept_codes": len(kept), "quantized_linears": len(inner.modules),
                                              "regrouped": len(regroup.columns)}}


def on_grid(index, modules: list[str], options: CompileOptions) -> list[str]:
    """The Linears whose (regrouped) weights lie on the compile's group grid: the ones the Sophgo build hands
    TPU-MLIR as codes (compile/tpumlir_codes.py decides the same way on the graph's own weights)."""
    from surgery.compile.tpumlir_codes import grid_codes, handover_bits

    bits = handover_bits(options.quantize, options.symmetric)
    if bits is None:
        return []
    weights = ((m, index.read([f"{m}.weight"])[f"{m}.weight"].float().t().contiguous().numpy()) for m in modules)
    return [m for m, w in weights if grid_codes(w, options.group_size, bits) is not None]


def report_lines(source: dict | None) -> list[str]:
    """Markdown for the report's "Source checkpoint" section (empty for a plain float checkpoint)."""
    if not source or (source.get("quantization") is None and source.get("lora") is None):
        return []
    lines = ["## Source checkpoint", ""]
    quant = source.get("quantization")
    if quant:
        lines.append(f"Quantization: {quant['summary']}, declared in {quant['source']}; exported as its exactly "
                     "dequantized weights.")
        compiler = source.get("compiler", {})
        if compiler.get("kept_codes"):
            lines.append(f"{compiler['kept_codes']} of {compiler['quantized_linears']} quantized Linears are stored "
                         "with the checkpoint's own codes and scales (no second quantization).")
        if compiler.get("regrouped"):
            lines.append(f"{compiler['regrouped']} act-order Linears were exported with their input channels sorted "
                         "by GPTQ group, so the compiler's contiguous groups are the checkpoint's groups.")
        if compiler.get("requantizes"):
            lines.append(f"The compiler re-quantizes: {compiler['how']}. Re-quantized vs checkpoint weights over "
                         f"{compiler['linears']} Linears: worst cosine {compiler['min_cosine']:.7f} "
                         f"({compiler['worst']}), mean {compiler['mean_cosine']:.7f}.")
        else:
            lines.append(f"The compiler re-quantizes: {'no' if compiler.get('requantizes') is False else 'unknown'}"
                         f" ({compiler.get('how', '-')}).")
    lora = source.get("lora")
    if lora:
        how = ("exported beside the base model as lora.mnn (MNN's engine loads it over the base with "
               "Llm::create_lora)" if lora.get("mode") == "separate" else "merged into the weights")
        lines.append(f"LoRA adapter {lora['adapter']}: r {lora['r']}, lora_alpha {lora['lora_alpha']}, rsLoRA "
                     f"{'yes' if lora['use_rslora'] else 'no'}, {lora['modules']} Linears, {how}.")
    return lines + [""]
