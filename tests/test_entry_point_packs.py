"""An out-of-tree pack: a tiny distribution with a `surgery.packs` entry point, pip-installed into a directory
of its own (never into the shared test venv), is found by `surgery list` and `surgery apply auto`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SURGERY = str(Path(sys.executable).with_name("surgery"))

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tinypack"
version = "0.1.0"

[project.entry-points."surgery.packs"]
tinyllama = "tinypack:PACK"
broken = "tinypack.missing:PACK"
"""

PACK = '''"""A user's own pack: the llama patches for a model type surgery does not know."""

from surgery.patches.native_rules import native_pack

PACK = native_pack("tinyllama", family="llama", model_types=("tinyllama",), architecture="LlamaForCausalLM",
                   summary="Llama under another model_type, packed out of tree")
'''


def install(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "tinypack").mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "tinypack" / "__init__.py").write_text(PACK)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(project)], check=True, capture_output=True, cwd=tmp_path)
    return target


def test_installed_pack_is_listed_and_applied(tmp_path: Path):
    site = install(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SURGERY, *args], cwd=tmp_path, capture_output=True, text=True, env=env)

    listed = run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    tiny = next(p for p in json.loads(listed.stdout) if p["name"] == "tinyllama")
    assert tiny["model_types"] == ["tinyllama"] and [p["id"] for p in tiny["patches"]][0] == "absolute-imports"
    assert listed.stderr.splitlines() == ["warning: pack entry point 'broken' (tinypack.missing:PACK) skipped: "
                                          "ModuleNotFoundError: No module named 'tinypack.missing'"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "tinyllama"}))
    applied = run("apply", "auto", "--model", "m", "--dry-run", "--json")
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout)
    assert summary["pack"] == "tinyllama"
    assert {p["outcome"] for p in summary["patches"]} == {"applied"}
    assert re.search(r"^\+ +# surgery: tinyllama/cache-to-present: ", summary["diff"], re.M)
