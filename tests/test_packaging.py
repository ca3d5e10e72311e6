"""`patches`, `export`, `compile`, `fixtures` install under `surgery.*` only, editable and as a wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.util as u, surgery.patches.qwen, surgery.export, surgery.compile, surgery.fixtures.qwen_v1;"
         "assert surgery.patches.qwen.PACK.name == 'qwen';"
         "assert surgery.fixtures.qwen_v1.render_modeling('2023-12');"
         "bad = [n for n in ('patches', 'export', 'compile', 'fixtures') if u.find_spec(n)];"
         "assert not bad, bad; print(surgery.patches.qwen.__file__)")


def probe(python: str, cwd: Path) -> str:
    # -I: no cwd or PYTHONPATH on sys.path, so only installed packages are visible
    result = subprocess.run([python, "-I", "-c", PROBE], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_editable_install_namespaces(tmp_path: Path):
    assert probe(sys.executable, tmp_path) == str(ROOT / "patches" / "qwen.py")


def test_wheel_installs_and_runs_the_pipeline(tmp_path: Path):
    """The wheel, installed non-editable by pip into a fresh venv (our dependencies visible, the checkout
    not), has every subpackage: `surgery list`, `surgery passes` and the demo pipeline run from it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("llm_surgery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"surgery"}
    assert "surgery/fixtures/qwen_remote/modeling_qwen.py.tmpl" in names
    packages = {str(Path(n).parent) for n in names if n.endswith("/__init__.py")}
    mapped = {"patches": "surgery/patches", "export": "surgery/export", "compile": "surgery/compile",
              "fixtures": "surgery/fixtures"}
    in_tree = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "surgery").rglob("__init__.py")}
    assert in_tree | set(mapped.values()) <= packages  # every package of the checkout is in the wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    assert probe(str(venv / "bin" / "python"), tmp_path) == str(site / "surgery" / "patches" / "qwen.py")
    surgery = str(venv / "bin" / "surgery")

    def run(*args: str) -> str:
        done = subprocess.run([surgery, *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"surgery {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    assert "qwen" in run("list") and "rmsnorm" in run("passes")
    run("fixture", "qwen", "--out", "m")
    run("apply", "qwen", "--model", "m", "--seq-length", "32", "--dtype", "fp32")
    run("export", "m-surgery", "--out", "onnx", "--seq-length", "32", "--trust-remote-code")
    run("verify", "onnx", "--trust-remote-code")
    before = run("run", "onnx", "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json")
    run("optimize", "onnx", "--target", "generic")
    after = run("run", "onnx", "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json")
    assert json.loads(before)["tokens"] == json.loads(after)["tokens"]
    installed_from = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", "import surgery.passes as p;"
                                     "print(p.__file__)"], capture_output=True, text=True, cwd=tmp_path).stdout
    assert installed_from.startswith(str(site))
