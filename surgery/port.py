"""`surgery port`: scaffold a pack, a fixture config and a conformance test for a new architecture."""

from __future__ import annotations

import re
from pathlib import Path

import libcst as cst

from surgery.apply import transformers_dir
from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_text
from surgery.packs import get_pack

SCAFFOLD_MARK = "Scaffolded by `surgery port"
NATIVE_PACK = '''"""{title} (`model_type: {name}`): transformers' own modeling code.

Scaffolded by `surgery port {name} --like {like}`; see docs/porting.md for what to check next.
"""

from surgery.patches.native_rules import native_pack

PACK = native_pack("{name}", family="{name}", model_types=("{name}",), architecture="{architecture}",
                   summary="{title} (transformers modeling_{name})")
'''

REMOTE_PACK = '''"""{title} (`model_type: {name}`) remote code, starting from the `{like}` pack's patches.

Scaffolded by `surgery port {name} --like {like}`: rename the file below to the model's modeling file,
then run the conformance test; a failed anchor names the rule and what it looked for (docs/porting.md).
"""

from surgery.packs import Pack
from surgery.patches.{like} import PATCHES, config_edits

PACK = Pack(
    name="{name}",
    version="0.1.0",
    summary="{title} remote code",
    model_types=("{name}",),
    architectures=("{architecture}",),
    files={{"modeling_{name}.py": PATCHES}},
    config_edits=config_edits,
    checked_with=">=5.0,<6",
    export_spec=None,  # an ArchSpec (surgery.export.arch) once the layout is known; the {like} pack's is a start
)
'''

TEST = '''"""Conformance of the `{name}` pack on a tiny config-built fixture (Scaffolded by `surgery port`)."""

from pathlib import Path

from surgery.conformance import check_pack
from surgery.fixtures.native import COMMON, build_from_config

# Tiny, GQA, large init range; add the family's own config fields here.
CONFIG = dict(COMMON, model_type="{name}")


def test_{ident}_conformance(tmp_path: Path):
    src = build_from_config(CONFIG, tmp_path / "src")
    report = check_pack("{name}", src, tmp_path / "work")
    assert report.logits_max_abs < 1e-5, report.logits_max_abs
    assert report.worst.cosine >= 0.99999, report.worst
    assert len(set(report.reference)) >= 8, "fixture too degenerate for a token test"
    assert report.tokens == report.reference
'''


def causal_lm_class(name: str) -> str | None:
    """The `*ForCausalLM` class of an installed transformers family, found by parsing (not importing)."""
    path = transformers_dir() / "models" / name / f"modeling_{name}.py"
    if not path.is_file():
        return None
    module = cst.parse_module(path.read_text(encoding="utf-8"))
    names = [s.name.value for s in module.body if isinstance(s, cst.ClassDef)]
    return next((n for suffix in ("ForCausalLM", "LMHeadModel") for n in names if n.endswith(suffix)), None)


def scaffold(name: str, like: str, dest: Path, force: bool = False) -> list[Path]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise SurgeryError(f"{name!r} is not a model_type-style name; use lowercase letters, digits and _")
    base = get_pack(like)
    native = bool(base.sources)
    architecture = causal_lm_class(name) if native else None
    if native and architecture is None:
        raise SurgeryError(f"transformers has no models/{name}/modeling_{name}.py with a causal-LM class; "
                           f"port it --like qwen (remote code) or check the model_type")
    title = name.replace("_", " ").title()
    files = {
        dest / "patches" / f"{name}.py": (NATIVE_PACK if native else REMOTE_PACK).format(
            name=name, like=like, title=title, architecture=architecture or f"{title.replace(' ', '')}ForCausalLM"),
        dest / "tests" / f"test_pack_{name}.py": TEST.format(name=name, ident=name),
    }
    existing = [p for p in files if p.exists() or p.is_symlink()]
    if existing and not force:
        raise SurgeryError(f"{existing[0]} exists; pass --force to overwrite it")
    for path in existing:  # --force replaces a scaffold surgery wrote, never a file someone else wrote
        if path.is_symlink() or not path.is_file() or SCAFFOLD_MARK not in path.read_text(errors="replace")[:600]:
            raise SurgeryError(f"{path} was not written by `surgery port`; move it or port under another name")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return list(files)
