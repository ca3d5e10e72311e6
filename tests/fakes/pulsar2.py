"""A stand-in for Axera's `pulsar2` (Docker-only): checks the `build` arguments and validates the config
against the BuildConfig fields documented in pulsar2-docs (user_guides_config/config.rst), then writes an
empty axmodel. Every problem is printed and exits 1, as the real tool would refuse the build."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx

ENUMS = {
    "model_type": {"ONNX", "QuantAxModel", "QuantONNX"},
    "target_hardware": {"AX650", "AX620E", "M76H", "M57"},
    "calibration_format": {"Image", "Numpy", "Binary", "NumpyObject"},
    "data_type": {"U8", "S8", "U16", "S16", "FP32"},
    "calibration_method": {"MinMax", "Percentile", "MSE", "KL"},
    "src_dtype": {"U8", "S8", "U16", "S16", "U32", "S32", "FP16", "FP32"},
}
NPU_MODES = {"AX650": {"NPU1", "NPU2", "NPU3"}, "AX620E": {"NPU1", "NPU2"}}
TOP = {"input", "output_dir", "output_name", "work_dir", "model_type", "target_hardware", "npu_mode",
       "input_shapes", "onnx_opt", "quant", "input_processors", "output_processors", "const_processors",
       "quant_op_processors", "compiler"}
QUANT = {"input_configs", "layer_configs", "calibration_method", "precision_analysis", "precision_analysis_method",
         "precision_analysis_mode", "input_sample_dir", "highest_mix_precision", "conv_bias_data_type",
         "ln_scale_data_type", "refine_weight_threshold", "enable_smooth_quant", "smooth_quant_threshold",
         "smooth_quant_strength", "transformer_opt_level", "check", "disable_auto_refine_scale",
         "enable_easy_quant", "disable_quant_optimization", "enable_brecq", "enable_lsq", "enable_adaround",
         "finetune_epochs", "finetune_block_size", "finetune_batch_size", "finetune_lr", "device"}
INPUT_CONFIG = {"tensor_name", "calibration_dataset", "calibration_format", "calibration_size", "calibration_mean",
                "calibration_std"}


def fail(msg):
    print(f"fake pulsar2: {msg}")
    sys.exit(1)


def main(argv):
    if len(argv) < 2 or argv[1] != "build":
        fail(f"expected `pulsar2 build ...`, got {argv[1:]}")
    if len(argv[2:]) % 2:
        fail(f"arguments do not pair up: {argv[2:]}")
    args = dict(zip(argv[2::2], argv[3::2], strict=True))
    if set(args) - {"--input", "--output_dir", "--config", "--target_hardware", "--npu_mode", "--output_name"}:
        fail(f"unknown arguments {sorted(set(args))}")
    config = json.loads(Path(args["--config"]).read_text())
    for key in ("input", "output_dir"):
        if key not in config:
            fail(f"config lacks required {key}")
    if set(config) - TOP:
        fail(f"unknown config fields {sorted(set(config) - TOP)}")
    for key in ("model_type", "target_hardware"):
        if key in config and config[key] not in ENUMS[key]:
            fail(f"{key} {config[key]!r} not in {sorted(ENUMS[key])}")
    if config.get("npu_mode") not in NPU_MODES.get(config["target_hardware"], {"NPU1"}):
        fail(f"npu_mode {config.get('npu_mode')} invalid for {config['target_hardware']}")
    if args.get("--target_hardware", config["target_hardware"]) != config["target_hardware"]:
        fail("--target_hardware disagrees with the config")
    if args["--input"] != config["input"]:
        fail("--input disagrees with the config")
    model = onnx.load(config["input"])
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    quant = config.get("quant", {})
    if set(quant) - QUANT:
        fail(f"unknown quant fields {sorted(set(quant) - QUANT)}")
    if quant.get("calibration_method", "MinMax") not in ENUMS["calibration_method"]:
        fail("bad calibration_method")
    seen = set()
    for ic in quant.get("input_configs", []):
        if set(ic) - INPUT_CONFIG or "tensor_name" not in ic or "calibration_dataset" not in ic:
            fail(f"bad input_config {ic}")
        if ic["tensor_name"] not in inputs:
            fail(f"input_config names {ic['tensor_name']}, not an input of {config['input']} ({sorted(inputs)})")
        if ic.get("calibration_format", "Image") not in ENUMS["calibration_format"]:
            fail("bad calibration_format")
        with tarfile.open(ic["calibration_dataset"]) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            if not members:
                fail(f"{ic['calibration_dataset']} is empty")
            for m in members:
                array = np.load(io.BytesIO(tar.extractfile(m).read()))
                if list(array.shape) != inputs[ic["tensor_name"]]:
                    fail(f"{m.name} in {ic['calibration_dataset']} has shape {list(array.shape)}, "
                         f"input {ic['tensor_name']} is {inputs[ic['tensor_name']]}")
        seen.add(ic["tensor_name"])
    if seen != set(inputs):
        fail(f"no calibration data for {sorted(set(inputs) - seen)}")
    for lc in quant.get("layer_configs", []):
        if lc.get("data_type", "U8") not in ENUMS["data_type"]:
            fail("bad layer data_type")
    for ip in config.get("input_processors", []):
        if ip.get("src_dtype", "FP32") not in ENUMS["src_dtype"]:
            fail("bad src_dtype")
    out = Path(args["--output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / config.get("output_name", "compiled.axmodel")).write_bytes(b"fake axmodel")
    with open(Path(args["--output_dir"]).parent / "calls.txt", "a") as fh:
        fh.write(" ".join(argv[1:]) + "\n")


if __name__ == "__main__":
    main(sys.argv)
