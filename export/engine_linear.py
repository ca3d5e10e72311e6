"""Linear layers of the engine graph as weightless custom nodes, their weights fetched one layer at a time.

At 7B the engine graph's weights are 28 GB in fp32, and MNNConvert holds a graph's weights whole (twice,
measured: its peak grew 1.9 GB per 0.8 GB layer). So for quantized weights every `nn.Linear` is traced as a
`LlmExporter::WeightlessLinear` node that carries only its name and sizes; MNNConvert keeps it as an `Extra`
op, and the MNN adapter replaces it with a block-quantized Convolution whose weights it writes itself
(compile/mnn_weights.py), streaming them through `LinearWeights` with one layer resident. MNN's own
`llmexport` builds its models the same way (its `FakeLinear` ops, rebuilt after conversion).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from surgery.export.weights import Resident

DOMAIN = "LlmExporter"
OP = "WeightlessLinear"


class WeightlessLinear(torch.autograd.Function):
    """y = x W^T + b with W and b left out of the graph: a node named after the module, with its sizes."""

    @staticmethod
    def symbolic(g, x, name: str, in_features: int, out_features: int, has_bias: int, seq_first: int):
        return g.op(f"{DOMAIN}::{OP}", x, name_s=name, in_features_i=in_features, out_features_i=out_features,
                    has_bias_i=has_bias, seq_first_i=seq_first)

    @staticmethod
    def forward(ctx, x, name: str, in_features: int, out_features: int, has_bias: int, seq_first: int):
        return x.new_zeros((*x.shape[:-1], out_features))  # the trace needs the shape only


def _seq_first(x: torch.Tensor) -> int:
    """The rebuilt op restores [1, S, out], or [S, 1, out] for sequence-first code (ChatGLM's [S, 1, H])."""
    return int(x.dim() == 3 and x.shape[0] != 1)


@contextlib.contextmanager
def weightless_linears(root: torch.nn.Module, extra: dict[str, torch.nn.Module] | None = None
                       ) -> Iterator[dict[str, torch.nn.Module]]:
    """While tracing `root`, every `nn.Linear` under it becomes a WeightlessLinear node named by its path in
    `root`; yields those modules by name (the names MNNConvert keeps on the ops). `extra`: modules by path that
    compute `x @ weight^T` without being an nn.Linear (Baichuan2's NormHead), traced the same way."""
    extra = extra or {}
    linears = {name: m for name, m in root.named_modules() if isinstance(m, torch.nn.Linear)} | extra
    for name, module in extra.items():
        out_features, in_features = module.weight.shape
        module.forward = (lambda x, n=name, i=in_features, o=out_features:
                          WeightlessLinear.apply(x, n, i, o, 0, _seq_first(x)))
    for name, module in linears.items():
        module.surgery_linear_name = name
    original = torch.nn.Linear.forward

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        name = getattr(self, "surgery_linear_name", None)
        if name is None:
            return original(self, x)
        return WeightlessLinear.apply(x, name, self.in_features, self.out_features, int(self.bias is not None),
                                      _seq_first(x))

    torch.nn.Linear.forward = forward
    try:
        yield linears
    finally:
        torch.nn.Linear.forward = original
        for module in linears.values():
            del module.surgery_linear_name
        for module in extra.values():
            del module.forward  # the instance attribute: the class's forward again


class LinearWeights:
    """A linear's fp32 weight [out, in] and bias by its name in the engine graph, read from the checkpoint
    with only the layer that owns it resident (`owner(name)` names that model submodule)."""

    def __init__(self, root: torch.nn.Module, resident: Resident, owner, linears: dict[str, torch.nn.Module],
                 folds: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        self.root, self.resident, self.owner, self.linears = root, resident, owner, linears
        self.folds = folds or {}  # name -> row-wise fold of the stored weight (ArchSpec.head_rows)

    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.resident.hold([self.owner(f"{name}.weight")])
        module = self.linears[name]
        bias = module.bias.data.float() if getattr(module, "bias", None) is not None else None
        weight = module.weight.data.float()
        return (self.folds[name](weight) if name in self.folds else weight), bias

    def close(self) -> None:
        self.resident.hold([])
