"""The patched model directory export reads: preflight checks, and the model as a weightless skeleton.

`load_streaming` builds the model with its parameters on the meta device and a `Resident` that loads one
module's weights at a time from safetensors, so export memory is one block, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from surgery.apply import RECORD
from surgery.errors import SurgeryError
from surgery.export.arch import ArchSpec
from surgery.export.checkpoint import open_checkpoint
from surgery.export.jobs import DTYPES, ExportOptions
from surgery.export.weights import Resident, parameters_on_meta
from surgery.packs import check_transformers, pack_for_model_type


def export_spec_for(model_type: str) -> ArchSpec:
    """The export spec the pack for `model_type` declares (warning when transformers is outside the range
    that pack was checked with); a one-line error when there is no pack or it declares no spec."""
    pack = pack_for_model_type(model_type)
    if pack is None:
        raise SurgeryError(f"export has no spec for model_type {model_type!r}; is there a pack for it "
                           "(`surgery list`)?")
    if pack.export_spec is None:
        raise SurgeryError(f"pack {pack.name!r} declares no export spec, so export cannot find the layers of a "
                           f"{model_type!r} model; give the pack an `export_spec` (docs/porting.md)")
    check_transformers(pack)
    return pack.export_spec


def check_source(model_dir: Path, options: ExportOptions) -> dict:
    """Preflight a directory written by `surgery apply`; return its config (nothing is loaded or run)."""
    record_path = model_dir / RECORD
    if not model_dir.is_dir() or not record_path.is_file():
        raise SurgeryError(f"{model_dir} was not produced by `surgery apply`; run `surgery apply <pack> "
                           f"--model {model_dir}` first and export its output")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("auto_map") and not options.trust_remote_code:
        raise SurgeryError(f"{model_dir} runs its own modeling code (auto_map); pass --trust-remote-code "
                           "if you trust it")
    export_spec_for(str(config.get("model_type")))
    check_weights(model_dir)
    return config


def forget_remote_classes() -> None:
    """transformers registers a remote-code model class under its config class, and two models whose
    configuration files are byte-identical share one config class: in one process, the second load then gets
    the first model's modeling code (measured: a 2023-09 Qwen loaded after a 2023-11 one ran the 2023-11
    file). Forgetting those registrations makes every load resolve its own `auto_map`."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping._extra_content.clear()


def _loading(model_dir: Path, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    forget_remote_classes()
    try:
        return build().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"cannot load {model_dir}: {first}; check the weights files") from None


def load_full(model_dir: Path, options: ExportOptions) -> tuple[torch.nn.Module, dict]:
    """The whole model in memory (what per-model export scripts do; kept for comparison in bench/)."""
    config = check_source(model_dir, options)
    from transformers import AutoModelForCausalLM

    model = _loading(model_dir, lambda: AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=options.trust_remote_code, dtype=DTYPES[options.dtype]))
    return model, config


def load_streaming(model_dir: Path, options: ExportOptions) -> tuple[Resident, dict]:
    """A parameter-less skeleton plus a loader that holds one module's weights at a time."""
    config = check_source(model_dir, options)
    from transformers import AutoConfig, AutoModelForCausalLM

    def build() -> torch.nn.Module:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=options.trust_remote_code)
        if hasattr(cfg, "quantization_config"):  # a GPTQ/AWQ checkpoint: built float, weights dequantized on read
            del cfg.quantization_config
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=options.trust_remote_code,
                                                    dtype=DTYPES[options.dtype])

    model = _loading(model_dir, build)
    spec = export_spec_for(config["model_type"])
    index = open_checkpoint(model_dir, config)
    aliases = checkpoint_aliases(model, spec, set(index.files) if spec.checkpoint_prefixes else set())
    if config.get("tie_word_embeddings"):
        embedding = f"{spec.embedding}.weight"
        aliases[f"{spec.lm_head}.weight"] = aliases.get(embedding, embedding)
    return Resident(model, index, DTYPES[options.dtype], aliases), config


def checkpoint_aliases(model: torch.nn.Module, spec: ArchSpec, stored: set[str]) -> dict[str, str]:
    """Parameter name -> checkpoint key where the checkpoint names it the way the family's files are stored
    (Qwen2-VL checkpoints keep `model.layers.*` and `visual.*` while the module tree says
    `model.language_model.layers.*` and `model.visual.*`); names the checkpoint already holds stay."""
    aliases: dict[str, str] = {}
    if not spec.checkpoint_prefixes:
        return aliases
    for name, _ in model.named_parameters(remove_duplicate=False):
        for module_prefix, stored_prefix in spec.checkpoint_prefixes:
            if name not in stored and name.startswith(module_prefix):
                aliases[name] = stored_prefix + name[len(module_prefix):]
                break
    return aliases


def check_weights(model_dir: Path) -> None:
    """Fail early, in one line, on missing, dangling or corrupt safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SurgeryError(f"{model_dir} has no *.safetensors weights; copy or link them in (or re-run apply)")
    for path in files:
        if not path.exists():
            raise SurgeryError(f"{path.name} links to {path.resolve()}, which is missing; restore the weights")
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise SurgeryError(f"{path.name} is not a readable safetensors file ({exc}); re-download it") from None
