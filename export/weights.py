"""Stream weights from safetensors into a parameter-less model skeleton, one module at a time.

A 7B model is 15 GB in bf16 and 30 GB once upcast; exporting it block by block needs only one block's
weights at once. The skeleton keeps its buffers (RoPE tables, masks) real and its parameters on the
meta device; `Resident.hold()` loads exactly the parameters a graph needs and drops the rest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import safe_open

from surgery.errors import SurgeryError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with meta parameters but real buffers (so computed constants stay correct)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


class SafetensorsIndex:
    """Which file holds which tensor: a single model.safetensors or a sharded index."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    self.files |= dict.fromkeys(handle.keys(), path)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator:
        """A lazily sliced view of one tensor (`view[a:b]` reads only those rows)."""
        with safe_open(str(self.files[name]), framework="pt") as handle:
            yield handle.get_slice(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a 2-D tensor, read without loading the rest (vocabulary tables)."""
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_slice(name)[start:stop]

    def shape(self, name: str) -> list[int]:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                out |= {name: handle.get_tensor(name) for name in wanted}
        return out


class Resident:
    """Keeps the parameters of a chosen set of submodules loaded, and no others."""

    def __init__(self, model: torch.nn.Module, index: SafetensorsIndex, dtype: torch.dtype,
                 aliases: dict[str, str] | None = None) -> None:
        self.model, self.index, self.dtype = model, index, dtype
        self.aliases = aliases or {}  # parameter name -> checkpoint key (tied weights)
        self.loaded: set[tuple[str, frozenset[str]]] = set()

    def hold(self, paths: Iterable[str], skip: Iterable[str] = ()) -> None:
        """Load the parameters under `paths` (except the full names in `skip`, e.g. vocabulary tables that
        export streams instead) and drop every other loaded parameter."""
        wanted = {(path, frozenset(skip)) for path in paths}
        for key in self.loaded - wanted:
            self._set(key[0], load=False)
        for key in wanted - self.loaded:
            self._set(key[0], load=True, skip=key[1])
        self.loaded = wanted

    def _set(self, path: str, load: bool, skip: frozenset[str] = frozenset()) -> None:
        module = attrgetter(path)(self.model) if path else self.model
        params = [(f"{path}.{name}" if path else name, owner, leaf)
                  for name, owner, leaf in _named_params(module)]
        if load:
            params = [p for p in params if p[0] not in skip]
        tensors = {}
        if load:
            keys = {full: self.aliases.get(full, full) for full, _, _ in params}
            missing = sorted(k for k in keys.values() if k not in self.index.files)
            if missing:
                raise SurgeryError(f"the weights have no tensor {missing[0]} (needed for {path}); "
                                   "the checkpoint does not match config.json")
            read = self.index.read(set(keys.values()))
            tensors = {full: read[key] for full, key in keys.items()}
            del read  # each checkpoint tensor is freed once converted (a bf16 head and its fp32 copy not both)
        for full, owner, leaf in params:
            old = owner._parameters[leaf]
            if load:
                value = tensors.pop(full).to(self.dtype)
                if tuple(value.shape) != tuple(old.shape):
                    raise SurgeryError(f"{full} has shape {tuple(value.shape)} in the weights but "
                                       f"{tuple(old.shape)} in the model; the checkpoint does not match config.json")
            else:
                value = torch.empty_like(old, device="meta")
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _named_params(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(dotted name, owning module, leaf name) for every parameter, shared ones once."""
    for prefix, owner in module.named_modules():
        for leaf, param in owner._parameters.items():
            if param is not None:
                yield (f"{prefix}.{leaf}" if prefix else leaf), owner, leaf
