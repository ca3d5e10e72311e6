"""`surgery apply`: plan a pack's edits on a model directory (read-only), then write them atomically.

The model's code is parsed with libcst and never imported or executed.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import libcst as cst

from surgery.codemod import Outcome, Patch, PatchResult, markers, run_patch
from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json, read_text, sha256_file, sha256_text, staged_directory
from surgery.outputs import claim, write_record
from surgery.packs import ApplyOptions, Pack, all_packs, check_seq_length, check_transformers, pack_for_model_type

RECORD = "surgery.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
LINK_ABOVE_BYTES = 16 << 20


@dataclass
class Plan:
    """Everything `apply` would do, computed without writing."""

    pack: Pack
    model_dir: Path
    options: ApplyOptions
    results: list[PatchResult]
    sources: dict[str, tuple[str, str]]  # file -> (before, after)
    config: tuple[dict, dict]
    config_text: str = field(default="")

    @property
    def changed(self) -> bool:
        return any(a != b for a, b in self.sources.values()) or self.config[0] != self.config[1]

    def diff(self) -> str:
        chunks = []
        old_cfg = self.config_text or json.dumps(self.config[0], indent=2) + "\n"
        for name, (before, after) in [*self.sources.items(), ("config.json", (old_cfg, _config_text(self.config[1])))]:
            if before != after:
                chunks.extend(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                                   f"a/{name}", f"b/{name}"))
        return "".join(chunks)


def _config_text(config: dict) -> str:
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def read_config(model_dir: Path) -> tuple[dict, str]:
    if not model_dir.exists():
        raise SurgeryError(f"model directory {model_dir} does not exist; pass the folder that holds config.json")
    if not model_dir.is_dir():
        raise SurgeryError(f"{model_dir} is not a directory; pass the model folder, not a file")
    path = model_dir / "config.json"
    if not path.is_file():
        raise SurgeryError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    text = read_text(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SurgeryError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise SurgeryError(f"{path} holds no JSON object; fix or re-download it")
    return config, text


def check_model_type(pack: Pack, config: dict, model_dir: Path) -> None:
    model_type = config.get("model_type")
    if model_type in pack.model_types:
        return
    fits = pack_for_model_type(str(model_type))
    hint = (f"use `surgery apply {fits.name}`" if fits else
            f"no pack handles it yet (packs: {', '.join(all_packs())})")
    raise SurgeryError(f"{model_dir} is a {model_type!r} model, but pack {pack.name!r} handles "
                       f"{', '.join(pack.model_types)}; {hint}")


def parse_source(path: Path) -> tuple[str, cst.Module]:
    text = read_text(path)
    try:
        return text, cst.parse_module(text)
    except cst.ParserSyntaxError as exc:
        raise SurgeryError(f"{path.name} line {exc.raw_line}: cannot parse Python ({exc.message.splitlines()[0]}); "
                           "restore the original file") from None


def select_patches(pack: Pack, only: Sequence[str] = (), skip: Sequence[str] = ()) -> dict[str, list[Patch]]:
    """The pack's patches per file, narrowed by `only` / `skip` (patch ids)."""
    known = {p.id for patches in pack.files.values() for p in patches}
    unknown = sorted((set(only) | set(skip)) - known)
    if unknown:
        raise SurgeryError(f"pack {pack.name!r} has no patch {', '.join(unknown)}; "
                           f"its patches: {', '.join(sorted(known))}")
    both = sorted(set(only) & set(skip))
    if both:
        raise SurgeryError(f"patch {both[0]} is in both --only and --skip; name it in one of them")
    return {f: [p for p in patches if (not only or p.id in only) and p.id not in skip]
            for f, patches in pack.files.items()}


def transformers_dir() -> Path:
    """The installed transformers package folder, found without importing it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise SurgeryError("transformers is not installed; install the project (make setup)")
    return Path(spec.submodule_search_locations[0])


def source_path(pack: Pack, model_dir: Path, filename: str) -> Path:
    """The file a pack rewrites: the model's own copy, else (native packs) the installed transformers one."""
    if (model_dir / filename).is_file():
        return model_dir / filename
    if filename in pack.sources:
        path = transformers_dir() / pack.sources[filename]
        if path.is_file():
            return path
        raise SurgeryError(f"the installed transformers has no {pack.sources[filename]}; pack {pack.name!r} "
                           f"was checked with transformers {pack.checked_with}")
    raise SurgeryError(f"{model_dir} has no {filename}, which pack {pack.name!r} rewrites; "
                       "copy the model's remote code files in")


def plan_apply(pack: Pack, model_dir: Path, options: ApplyOptions) -> Plan:
    """Run the pack's patches in memory. Raises SurgeryError when a required anchor is missing."""
    config, config_text = read_config(model_dir)
    check_model_type(pack, config, model_dir)
    if pack.check_config is not None:
        pack.check_config(config)
    check_transformers(pack)
    if options.seq_length is not None:
        check_seq_length(options.seq_length, config)
    results: list[PatchResult] = []
    sources: dict[str, tuple[str, str]] = {}
    for filename, patches in select_patches(pack, options.only, options.skip).items():
        path = source_path(pack, model_dir, filename)
        before, module = parse_source(path)
        present = markers(module)
        for patch in patches:
            module, result = run_patch(patch, pack.name, filename, module, present)
            results.append(result)
        sources[filename] = (before, module.code)
    missing = [r for r in results if r.outcome is Outcome.ANCHOR_NOT_FOUND]
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SurgeryError(f"pack {pack.name}, patch {first.patch}, file {first.file}: anchor not found; "
                           f"looked for {first.detail}{more}. Nothing was written")
    new_config = {**config, **pack.config_edits(options)}
    return Plan(pack, model_dir, options, results, sources, (config, new_config), config_text)


def default_out(model_dir: Path) -> Path:
    """`<model>-surgery` beside the model (resolved first: `--model .` names the directory, not `.`)."""
    model_dir = Path(model_dir)
    if model_dir.name in ("", ".", ".."):
        model_dir = model_dir.resolve()
    return model_dir.parent / f"{model_dir.name}-surgery"


def tool_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for dist in ("llm-surgery", "libcst", "transformers", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _hashes(model_dir: Path, plan: Plan) -> dict[str, dict[str, str]]:
    hashes = {name: {"before": sha256_text(before), "after": sha256_text(after)}
              for name, (before, after) in plan.sources.items()}
    for path in sorted(model_dir.glob("*.py")):
        if path.name not in hashes:
            digest = sha256_file(path)
            hashes[path.name] = {"before": digest, "after": digest}
    hashes["config.json"] = {"before": sha256_file(model_dir / "config.json"),
                             "after": sha256_text(_config_text(plan.config[1]))}
    return hashes


def write_plan(plan: Plan, out: Path, force: bool = False) -> dict:
    """Write the patched model directory atomically; return the record stored as surgery.json."""
    model_dir = plan.model_dir
    claim(out, "apply", {"model": model_dir}, force, create=False)  # never the model, nor what surgery did not write
    record = {
        "tool": "surgery",
        "pack": {"name": plan.pack.name, "version": plan.pack.version, "checked_with": plan.pack.checked_with},
        "source": str(model_dir.resolve()),
        "options": plan.options.as_dict(),
        "patches": [r.as_dict() for r in plan.results],
        "config_edits": {k: v for k, v in plan.config[1].items() if plan.config[0].get(k, object()) != v},
        "hashes": _hashes(model_dir, plan),
        "linked": [],
        "versions": tool_versions(),
    }
    with staged_directory(out) as stage:
        for src in sorted(model_dir.rglob("*")):
            rel = src.relative_to(model_dir)
            if any(part.startswith(".") for part in rel.parts) or rel.name == RECORD or src.is_dir():
                continue
            if str(rel) in plan.sources or rel.name == "config.json" and len(rel.parts) == 1:
                continue
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            real = src.resolve()
            if rel.suffix in WEIGHT_SUFFIXES or real.stat().st_size > LINK_ABOVE_BYTES:
                dst.symlink_to(real)
                record["linked"].append(str(rel))
            else:
                shutil.copy2(real, dst)
        for name, (_, after) in plan.sources.items():
            (stage / name).write_text(after, encoding="utf-8")
        (stage / "config.json").write_text(_config_text(plan.config[1]), encoding="utf-8")
        atomic_write_json(stage / RECORD, record)
        write_record(stage, "apply", {"model": model_dir})
    return record
