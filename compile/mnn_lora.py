"""A LoRA adapter as a model of its own beside the base model in MNN's engine layout (`--lora-mode separate`).

What MNN 3.6.1 offers (alibaba/MNN at tag 3.6.1):
- `Llm::create_lora(lora_path)` (transformers/llm/engine/src/llm.cpp) makes a second `Llm` from the loaded
  base one: a copy of its config with `llm_model` = the LoRA model (a path relative to the config's
  directory; `llm_weight` stays the base's weight file) and `Module::Config::base` = the base's module.
  Loading it, every Convolution, Attention, RoPE... whose op name, type and parameter type match a base op
  reuses the base's execution and so its weights (express/module/StaticModule.cpp `cloneBaseExecution`);
  the other ops come from the LoRA model itself. Base and LoRA model are two engine objects over one copy
  of the base weights: switching adapters is choosing which one to call (each keeps its own KV cache).
- llmexport's `--lora_split` (transformers/llm/export/utils/lora.py) writes such a model, `lora.mnn`: the
  base graph in which each adapted linear's output gets `B(A(x))` added, A and B as float 1x1
  Convolutions with their weights inline and B pre-multiplied by the scale.
- The Python binding's C object has `create_lora` (pymnn/src/llm.h); the wrapper's `Llm.apply_lora` /
  `select_module` call C methods 3.6.1 no longer has (AttributeError), so callers use
  `model._c_obj.create_lora("lora.mnn")` (compile/mnn_worker.py).

`lora_graph` builds that model from our final engine graph (the JSON form compile/mnn_llm.py converts to
`llm.mnn`), with the adapter's own scale (lora_alpha / r, rsLoRA, alpha_pattern: export/lora.py).
"""

from __future__ import annotations

import copy

import torch
from safetensors import safe_open

from surgery.errors import SurgeryError
from surgery.export.lora import WEIGHTS, Adapter


def engine_names(weights) -> dict[str, str]:
    """Engine linear name -> the checkpoint module it reads (what an adapter names), from the traced
    linears (export/engine_linear.py LinearWeights)."""
    resident = weights.resident
    paths = {id(m): n for n, m in resident.model.named_modules()}
    out = {}
    for name, linear in weights.linears.items():
        path = paths.get(id(linear))
        if path is not None:
            out[name] = resident.aliases.get(f"{path}.weight", f"{path}.weight")[: -len(".weight")]
    return out


def _conv(name: str, ic: int, oc: int, weight: torch.Tensor, inputs: list[int], outputs: list[int]) -> dict:
    """A float 1x1 Convolution with inline weights (llmexport's LoRA.build_conv)."""
    common = {"dilateX": 1, "dilateY": 1, "strideX": 1, "strideY": 1, "kernelX": 1, "kernelY": 1, "padX": 0,
              "padY": 0, "group": 1, "outputCount": oc, "relu": False, "padMode": "CAFFE", "relu6": False,
              "inputCount": ic, "hasOutputShape": False}
    return {"type": "Convolution", "main_type": "Convolution2D", "name": name, "inputIndexes": inputs,
            "outputIndexes": outputs, "defaultDimentionFormat": "NHWC",
            "main": {"common": common, "weight": weight.flatten().tolist(), "bias": [0.0] * oc}}


def lora_graph(graph: dict, adapter: Adapter, names: dict[str, str]) -> dict:
    """A copy of the engine graph `graph` with `B(A(x)) * scale` added to every adapted linear's output
    (before its NC4HW4 -> NCHW conversion); every adapted module must be one of the graph's linears."""
    lora = copy.deepcopy(graph)
    ops, added = [], set()
    with safe_open(str(adapter.path / WEIGHTS), framework="pt") as handle:
        for op in lora["oplists"]:
            ops.append(op)
            module = names.get(op.get("name", "")) if op.get("type") == "Convolution" else None
            if module not in adapter.modules:
                continue
            a_key, b_key = adapter.modules[module]
            a, b = handle.get_tensor(a_key).float(), handle.get_tensor(b_key).float() * adapter.scales[module]
            common = op["main"]["common"]
            if a.shape[1] != common["inputCount"] or b.shape[0] != common["outputCount"]:
                raise SurgeryError(f"{module}: lora_B @ lora_A is {b.shape[0]}x{a.shape[1]} but the linear is "
                                   f"{common['outputCount']}x{common['inputCount']}; the adapter belongs to another "
                                   "model")
            out = op["outputIndexes"][0]
            mid, delta, total = (_tensor(lora, f"{op['name']}/lora_{s}") for s in ("A", "B", "add"))
            ops += [_conv(f"{op['name']}/lora_A", a.shape[1], a.shape[0], a, op["inputIndexes"][:1], [mid]),
                    _conv(f"{op['name']}/lora_B", b.shape[1], b.shape[0], b, [mid], [delta]),
                    {"type": "BinaryOp", "main_type": "BinaryOp", "name": f"{op['name']}/lora_add",
                     "inputIndexes": [out, delta], "outputIndexes": [total], "defaultDimentionFormat": "NHWC",
                     "main": {"opType": "ADD", "T": "DT_FLOAT", "activationType": 0}}]
            for consumer in lora["oplists"]:
                if consumer is not op and out in consumer.get("inputIndexes", []):
                    consumer["inputIndexes"] = [total if i == out else i for i in consumer["inputIndexes"]]
            added.add(module)
    missing = sorted(set(adapter.modules) - added)
    if missing:
        raise SurgeryError(f"the adapter targets {missing[0]}, which is not a linear of the engine graph; was it "
                           "trained on this base model?")
    lora["oplists"] = ops
    return lora


def _tensor(graph: dict, name: str) -> int:
    graph["tensorName"].append(name)
    return len(graph["tensorName"]) - 1
