"""Block-quantized linear weights written straight into `llm.mnn.weight`, one linear at a time.

The engine graph reaches MNNConvert without its linear weights (export/engine_linear.py): each linear is an
`Extra(WeightlessLinear)` op. Here each becomes what MNNConvert would have made of a quantized linear, a 1x1
Convolution between two reshapes (and the NC4HW4 layout conversions MNN's convolutions run in), with its
weights appended to the weight file MNNConvert wrote for the rest of the graph. The storage, as MNN's
loaders read it (source/core/IDSTEncoder.hpp, ConvolutionCommon.cpp; llmexport writes the same):
- `external = [offset, weight bytes, scale bytes, bias bytes, 0]` into the weight file;
- weight bytes: a header (1 byte: 2 dims; [oc, ic] as uint16, int32 if either exceeds 65535; the value
  map: its length then the int8 values -2^(b-1) .. 2^(b-1)-1, length 0 standing for 256), then each value
  `q + 2^(b-1)` packed `b` bits wide, high bits first, row-major [oc, ic];
- scales, fp32 per (row, block): symmetric `absmax / (2^(b-1)-1)`; asymmetric pairs `(zero, scale)` with
  `w = (q + 2^(b-1) - 2^(b-1)) * scale + zero`, i.e. the zero already in the loader's form (`aMin = 1`),
  which is also what the engine's tied-embedding reader decodes (compile/mnn_tie.py);
- the bias, fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.export.engine_linear import OP

ROWS_PER_CHUNK = 8192  # rows quantized at once: a 151936-row head never has its temporaries whole


def block_for(ic: int, block: int) -> int:
    """The block MNN uses for `ic` inputs: the asked one halved until it divides (0: one block per row)."""
    size = block or ic
    while ic % size:
        size //= 2
    return size


def quantize(weight: torch.Tensor, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Packed values (uint8) and fp32 scales of `weight` [oc, ic] in MNN's block storage."""
    oc, ic = weight.shape
    offset, top = 1 << (bits - 1), (1 << (bits - 1)) - 1
    w = weight.float().reshape(oc, ic // block, block)
    if symmetric:
        scale = w.abs().amax(-1, keepdim=True) / top
        q = torch.round(w / torch.where(scale == 0, 1.0, scale)).clamp(-top, top)
        alpha = scale.flatten()
    else:
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (high - low) / (2 * offset - 1)
        q = (torch.round((w - low) / torch.where(scale == 0, 1.0, scale)) - offset).clamp(-offset, top)
        alpha = torch.stack([(low + offset * scale).flatten(), scale.flatten()], -1).flatten()
    return pack((q + offset).to(torch.uint8).flatten().numpy(), bits), alpha.numpy().astype("<f4")


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Stored values (uint8, 0 .. 2^bits - 1, row-major) packed `bits` wide, high bits first."""
    if bits == 4:
        return (values[0::2] << 4) | values[1::2]
    if bits != 8:
        raise SurgeryError(f"MNN weights of {bits} bits are not written here; use 4 or 8")
    return values


def header(oc: int, ic: int, bits: int) -> tuple[bytes, bool]:
    wide = oc > 65535 or ic > 65535
    values = list(range(-(1 << (bits - 1)), 1 << (bits - 1)))
    table = [0 if len(values) == 256 else len(values), *values]
    dims = np.array([oc, ic], dtype="<i4" if wide else "<u2").tobytes()  # MNN reads uint16 (IDSTDecoder)
    return b"\x02" + dims + np.array(table, dtype=np.int8).tobytes(), wide


def append_entry(file, oc: int, ic: int, bits: int, rows: Iterable[tuple[np.ndarray, np.ndarray]],
                 bias: torch.Tensor | None) -> tuple[list[int], bool]:
    """Append one linear's entry at the file's end: header, the packed values of every chunk of `rows`
    ((packed values, fp32 scales) of consecutive rows), then every scale, then the bias. Returns its
    `external` entry and whether its dims are int32."""
    start = file.tell()
    head, wide = header(oc, ic, bits)
    file.write(head)
    scales = []
    for stored, alpha in rows:  # packed values first, all rows; then every scale
        file.write(stored.tobytes())
        scales.append(alpha)
    weight_bytes = file.tell() - start
    file.write(np.concatenate(scales).tobytes())
    scale_bytes = file.tell() - start - weight_bytes
    bias_bytes = file.write(bias.numpy().astype("<f4").tobytes()) if bias is not None else 0
    return [start, weight_bytes, scale_bytes, bias_bytes, 0], wide


def write_linear(file, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, block: int,
                 symmetric: bool) -> tuple[list[int], bool]:
    """Append one float linear, quantized here chunk by chunk; see `append_entry`."""
    oc, ic = weight.shape
    rows = (quantize(weight[row:row + ROWS_PER_CHUNK], bits, block, symmetric) for row in range(0, oc, ROWS_PER_CHUNK))
    return append_entry(file, oc, ic, bits, rows, bias)


def _attrs(op: dict) -> dict:
    return {a["key"]: a.get("s", a.get("i")) for a in op["main"].get("attr", [])}


def _tensor(graph: dict, name: str) -> list[int]:
    graph["tensorName"].append(name)
    return [len(graph["tensorName"]) - 1]


def _convolution(name: str, ic: int, oc: int, external: list[int], wide: bool, bits: int, block: int,
                 symmetric: bool) -> dict:
    quan = {"quantScale": 1.0, "scaleIn": 0.0, "scaleOut": 0.0, "useInt32": False, "has_scaleInt": False,
            "shapeInt32": wide, "type": 1, "aMaxOrBits": bits, "weightSize": 0,
            "aMin": 0 if symmetric else 1, "readType": 0 if symmetric else oc * (ic // block)}
    common = {"dilateX": 1, "dilateY": 1, "strideX": 1, "strideY": 1, "kernelX": 1, "kernelY": 1, "padX": 0,
              "padY": 0, "group": 1, "outputCount": oc, "relu": False, "padMode": "CAFFE", "relu6": False,
              "inputCount": ic, "hasOutputShape": False}
    return {"type": "Convolution", "main_type": "Convolution2D", "name": name,
            "main": {"common": common, "quanParameter": quan, "external": external}}


def linear_ops(op: dict, graph: dict, external: list[int], wide: bool, bits: int, block: int,
               symmetric: bool) -> list[dict]:
    """Reshape [.., ic] -> [n, ic, 1, 1], to NC4HW4, Convolution, back to NCHW, Reshape -> [1, n, oc] (or
    [n, 1, oc] for a sequence-first input, `seq_first` on the traced op)."""
    a = _attrs(op)
    name, ic, oc = a["name"], a["in_features"], a["out_features"]
    t = [_tensor(graph, f"{name}/{step}") for step in ("pre_reshape", "pre_convert", "conv", "post_convert")]
    ins, outs = [op["inputIndexes"], *t], [*t, op["outputIndexes"]]
    lead = [-1, 1] if a.get("seq_first") == 1 else [1, -1]
    shapes = ({"dims": [-1, ic, 1, 1], "dimType": "NCHW"}, {"dims": [*lead, oc], "dimType": "NCHW"})
    convert = ({"source": "NCHW", "dest": "NC4HW4"}, {"source": "NC4HW4", "dest": "NCHW"})
    ops = [{"type": "Reshape", "main_type": "Reshape", "name": f"{name}/pre_reshape", "main": shapes[0]},
           {"type": "ConvertTensor", "main_type": "TensorConvertInfo", "name": f"{name}/pre_convert",
            "main": convert[0]},
           _convolution(name, ic, oc, external, wide, bits, block, symmetric),
           {"type": "ConvertTensor", "main_type": "TensorConvertInfo", "name": f"{name}/post_convert",
            "main": convert[1]},
           {"type": "Reshape", "main_type": "Reshape", "name": f"{name}/post_reshape", "main": shapes[1]}]
    for new, i, o in zip(ops, ins, outs, strict=True):
        new.update(inputIndexes=i, outputIndexes=o, defaultDimentionFormat="NHWC")
    return ops


def write_linears(graph: dict, weight_file: Path, fetch: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]],
                  bits: int, block: int, symmetric: bool, progress: Callable[[str], None] = lambda s: None,
                  codes: Callable | None = None) -> int:
    """Replace every `Extra(WeightlessLinear)` op of `graph` (in place), appending its weights to
    `weight_file`; returns how many. A linear shared by two ops (a tied head read twice) is written once.
    `codes(name, bits, block)` may give a pre-quantized checkpoint's own codes for a linear
    (compile/mnn_codes.py), which are then stored as they are instead of quantizing the float weight."""
    written: dict[str, tuple[list[int], bool, int, bool]] = {}
    out, count = [], 0
    with open(weight_file, "ab") as file:
        for op in graph["oplists"]:
            if op.get("type") != "Extra" or (op.get("main") or {}).get("type") != OP:
                out.append(op)
                continue
            a = _attrs(op)
            if a["name"] not in written:
                progress(a["name"])
                weight, bias = fetch(a["name"])
                traced = (a["out_features"], a["in_features"])
                if tuple(weight.shape) != traced or (bias is not None) != bool(a["has_bias"]):
                    raise SurgeryError(f"{a['name']}: the checkpoint's weight {tuple(weight.shape)} does not match the "
                                       f"traced linear ({a['out_features']}, {a['in_features']})")
                size = block_for(a["in_features"], block)
                own = codes(a["name"], bits, size) if codes is not None else None
                if own is not None:
                    from surgery.compile.mnn_codes import write_codes

                    written[a["name"]] = (*write_codes(file, own, bias), size, False)  # stored asymmetric
                else:
                    written[a["name"]] = (*write_linear(file, weight, bias, bits, size, symmetric), size, symmetric)
                del weight, bias, own
            external, wide, size, sym = written[a["name"]]
            out.extend(linear_ops(op, graph, external, wide, bits, size, sym))
            count += 1
    graph["oplists"] = out
    return count
