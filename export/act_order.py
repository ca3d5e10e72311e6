"""GPTQ act-order groups made contiguous at export, so a compiler's per-group quantization sees them.

An act-order (`desc_act`) GPTQ Linear quantizes input channel k in group `g_idx[k]`, and the groups are
scattered over the channels. Compilers quantize groups of consecutive input channels (TPU-MLIR's
W4BF16 `--q_group_size`, per `[row, k // group]`), so handed the dequantized weights as they are, every one
of their groups mixes channels of several checkpoint groups and the second quantization loses accuracy
(measured on the act-order fixture: block cosine 0.9855 on the bm1684x simulator).

Sorting the input channels by group, `W[:, perm]` with `perm = argsort(g_idx)`, makes checkpoint group j
the channels `j*g .. j*g+g-1`, which are exactly the compiler's group j; the activation that feeds the
Linear is permuted the same way, so the graph computes the same function:

- generally by a constant Gather on the input's last axis (a forward pre-hook on the module, traced as
  one ONNX Gather);
- for `mlp.down_proj` of a gated MLP (`down(act(gate(x)) * up(x))`, which is elementwise over the
  intermediate channels) by permuting the *rows* of gate_proj and up_proj instead: their outputs come out
  already in down_proj's order and no Gather is needed. Rows do not disturb gate/up's own groups, which
  run along their input channels.

Exact when every group holds `group_size` channels (GPTQ's act-order always does); modules whose g_idx is
already `arange(K) // group` (no act-order, or GPTQModel's static groups) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from surgery.export.derived import DerivedIndex
from surgery.export.quantized import DequantizedIndex
from surgery.export.weights import SafetensorsIndex

GATED = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Regroup:
    """Per checkpoint module (as the checkpoint names it): the input permutation its weight columns take,
    the output permutation its rows (and bias) take, and which modules gather their input at run time."""

    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    gather: dict[str, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.columns)


def dequantized(index: SafetensorsIndex | DerivedIndex) -> DequantizedIndex | None:
    """The GPTQ/AWQ layer of a checkpoint index (under a LoRA merge, say), or None for a float one."""
    while isinstance(index, DerivedIndex):
        if isinstance(index, DequantizedIndex):
            return index
        index = index.base
    return None


def scattered(index: SafetensorsIndex | DerivedIndex) -> dict[str, torch.Tensor]:
    """module -> the permutation that makes its groups contiguous, for each GPTQ Linear whose g_idx is
    not already contiguous and whose groups all hold `group_size` channels."""
    inner = dequantized(index)
    if inner is None or inner.quant.method != "gptq" or not inner.quant.desc_act or inner.quant.group_size <= 0:
        return {}
    group = inner.quant.group_size
    perms = {}
    for module in inner.modules:
        name = f"{module}.g_idx"
        if name not in inner.base.files:
            continue
        g_idx = inner.base.read([name])[name].long()
        if torch.equal(g_idx, torch.arange(len(g_idx)) // group):
            continue
        if len(g_idx) % group or not torch.all(torch.bincount(g_idx, minlength=len(g_idx) // group) == group):
            continue  # groups of unequal size have no contiguous equivalent; the compiler re-quantizes
        perms[module] = torch.argsort(g_idx, stable=True)
    return perms


def plan(index: SafetensorsIndex | DerivedIndex, gated: Callable[[str], bool] = lambda parent: True) -> Regroup:
    """The regrouping of every act-order Linear in `index`; `gated(parent)` says whether the module
    `parent` (holding gate_proj, up_proj, down_proj) computes `down(act(gate(x)) * up(x))`."""
    perms = scattered(index)
    out = Regroup()
    for module, perm in perms.items():
        out.columns[module] = perm
        parent, _, leaf = module.rpartition(".")
        siblings = [f"{parent}.{name}.weight" for name in GATED[:2]]
        if leaf == GATED[2] and all(s in index.files for s in siblings) and gated(parent):
            for sibling in GATED[:2]:
                out.rows[f"{parent}.{sibling}"] = perm
        else:
            out.gather[module] = perm
    return out


class RegroupedIndex(DerivedIndex):
    """`<module>.weight` with its columns (and rows) permuted per `regroup`, a row-permuted module's bias too."""

    def __init__(self, base: SafetensorsIndex | DerivedIndex, regroup: Regroup) -> None:
        super().__init__(base)
        self.regroup = regroup
        for module in set(regroup.columns) | set(regroup.rows):
            self.derived.add(f"{module}.weight")
        self.derived |= {f"{m}.bias" for m in regroup.rows if f"{m}.bias" in base.files}

    def derived_shape(self, name: str) -> list[int]:
        return self.base.shape(name)

    def derive(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        tensor = self.base.read([name])[name]
        if module in self.regroup.rows:
            tensor = tensor[self.regroup.rows[module]]
        if leaf == "weight" and module in self.regroup.columns:
            tensor = tensor[:, self.regroup.columns[module]]
        return tensor.contiguous()


def regroup_model(model: torch.nn.Module, index: SafetensorsIndex | DerivedIndex,
                  aliases: dict[str, str]) -> tuple[SafetensorsIndex | DerivedIndex, Regroup]:
    """Install the input Gathers on `model`'s act-order Linears and return the index that feeds them their
    regrouped weights (the index unchanged, and an empty plan, when nothing is act-order)."""
    names = {aliases.get(f"{name}.weight", f"{name}.weight")[: -len(".weight")]: name
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = dict(model.named_modules())

    def gated(parent: str) -> bool:
        down = names.get(f"{parent}.{GATED[2]}")
        owner = modules.get(down.rpartition(".")[0]) if down else None
        return owner is not None and hasattr(owner, "act_fn") and all(
            isinstance(getattr(owner, leaf, None), torch.nn.Linear) for leaf in GATED)

    regroup = plan(index, gated)
    if not regroup:
        return index, regroup
    for module, perm in regroup.gather.items():
        modules[names[module]].register_forward_pre_hook(_gather(perm))
    return RegroupedIndex(index, regroup), regroup


def _gather(perm: torch.Tensor) -> Callable:
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].index_select(-1, perm), *args[1:])
    return hook
