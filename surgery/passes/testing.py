"""Helpers for the pass tests beside each pass: tiny graphs from torch, and an onnxruntime parity check."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import torch

from surgery.parity import compare
from surgery.passes import PASSES, run_pass


def export(module: torch.nn.Module, *inputs: torch.Tensor, opset: int = 17,
           names: list[str] | None = None) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), inputs, buf, opset_version=opset, dynamo=False,
                      input_names=names or [f"in{i}" for i in range(len(inputs))])
    return onnx.load_from_string(buf.getvalue())


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = (rng.integers(0, 8, shape) if np.issubdtype(dtype, np.integer)
                             else rng.standard_normal(shape)).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def apply_checked(model: onnx.ModelProto, name: str, min_cosine: float = 0.99999) -> tuple[onnx.ModelProto, int]:
    """Run one pass and assert the outputs stay within `min_cosine` of the input graph's."""
    out, sites = run_pass(model, PASSES[name])
    feeds = feeds_for(model)
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in out.graph.input}
    for got, want in zip(run(out, {k: v.astype(types[k]) for k, v in feeds.items() if k in types}),
                         run(model, feeds), strict=True):
        assert got.shape == want.shape
        assert compare(name, "", got, want).cosine >= min_cosine
    return out, sites


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
