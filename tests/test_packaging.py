"""`patches`, `export`, `compile`, `fixtures` install under `surgery.*` only, editable and as a wheel."""

from __future__ import annotations

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


def test_wheel_namespaces(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("llm_surgery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"surgery"}
    assert "surgery/fixtures/qwen_remote/modeling_qwen.py.tmpl" in names
    # a bare venv that sees our dependencies but not the editable install, with the wheel unpacked in it
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    zipfile.ZipFile(wheel).extractall(site)
    assert probe(str(venv / "bin" / "python"), tmp_path) == str(site / "surgery" / "patches" / "qwen.py")
