"""Vendor toolchains, each in its own virtual environment under a cache directory.

Their pins clash with ours (TPU-MLIR wants Python 3.10, numpy 1.24, onnx 1.14), so adapters never import
them: they run the toolchain's own Python as a subprocess. A toolchain directory counts as installed
only once `toolchain.json` is written, last; an interrupted install is wiped and redone.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from surgery.compile.logged import run_logged
from surgery.errors import SurgeryError
from surgery.fsutil import atomic_write_json

RECORD = "toolchain.json"


def home() -> Path:
    return Path(os.environ.get("SURGERY_HOME", Path.home() / ".cache" / "surgery")).expanduser() / "toolchains"


def _move_bundled_glibc(env: Path) -> list[str]:
    """tpu_mlir ships an old glibc in lib/third_party that breaks every console script on newer hosts."""
    moved = []
    for lib in glob.glob(str(env / "lib/python*/site-packages/tpu_mlir/lib/third_party")):
        aside = Path(lib) / "moved-aside-by-surgery"
        aside.mkdir(exist_ok=True)
        for name in ("libc.so.6", "libm.so.6", "libpthread.so.0"):
            if (Path(lib) / name).exists():
                shutil.move(str(Path(lib) / name), aside / name)
                moved.append(name)
    return moved


@dataclass(frozen=True)
class Toolchain:
    name: str
    summary: str
    python: str  # major.minor the toolchain's wheels need
    steps: tuple[tuple[str, ...], ...]  # `pip install` argument lists, in order
    dist: str  # the distribution whose version identifies the toolchain
    fixes: tuple[Callable[[Path], list[str]], ...] = field(default=())


TOOLCHAINS = {
    "mnn": Toolchain("mnn", "MNN converter and runtime (PyPI MNN)", "3.11", (("MNN==3.6.1", "numpy"),), "MNN"),
    "sophgo": Toolchain("sophgo", "Sophgo TPU-MLIR: model_transform, model_deploy, model_runner, model_tool",
                        # psutil, tqdm: imported but undeclared; setuptools<81: tpu_mlir imports pkg_resources;
                        # torch: the ONNX front end imports it (PyPI has only the CUDA build for 3.10; it runs on CPU)
                        "3.10", (("tpu_mlir[onnx]==1.30.2", "psutil", "tqdm", "setuptools<81", "torch"),), "tpu_mlir",
                        fixes=(_move_bundled_glibc,)),
    # rknn-toolkit2 pins torch<=2.4 and numpy<=1.26.4: its dependencies by hand (torch 2.13.0 works), then
    # the wheel without its pins
    "rknn": Toolchain("rknn", "Rockchip rknn-toolkit2 (converter and CPU simulator)", "3.11", (
        ("protobuf>=4.21.6,<=4.25.4", "psutil", "ruamel.yaml", "scipy", "tqdm", "opencv-python-headless",
         "fast-histogram", "numpy<=1.26.4", "onnx>=1.16.1,<=1.18.0", "onnxruntime", "torch==2.13.0",
         "setuptools<81"),
        ("--no-deps", "rknn-toolkit2==2.5.0"),
    ), "rknn-toolkit2"),
}


def get(name: str) -> Toolchain:
    if name not in TOOLCHAINS:
        raise SurgeryError(f"no toolchain named {name!r}; available: {', '.join(TOOLCHAINS)}")
    return TOOLCHAINS[name]


def find_python(version: str) -> str:
    """A Python interpreter of `version`: on PATH, else a pyenv build."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", "0"], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python{version}"))):
        return candidate
    raise SurgeryError(f"Python {version} is not installed; this toolchain's wheels need it "
                       f"(e.g. `pyenv install {version}` or your distribution's python{version} package)")


def env_dir(name: str) -> Path:
    return home() / name


def installed(name: str) -> dict | None:
    record = env_dir(name) / RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def bin_env(name: str) -> dict[str, str]:
    """Environment for running a toolchain's commands: its bin/ first (its tools call each other by name)."""
    return {**os.environ, "PATH": f"{env_dir(name) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def python_of(name: str) -> Path:
    """The toolchain's interpreter, or a one-line error saying how to install it."""
    if installed(name) is None:
        raise SurgeryError(f"the {name} toolchain is not installed; run `surgery toolchain install {name}`")
    return env_dir(name) / "bin" / "python"


def install(name: str, log: Callable[[str], None] = lambda line: None) -> dict:
    chain = get(name)
    target = env_dir(name)
    if installed(name):
        return installed(name)
    shutil.rmtree(target, ignore_errors=True)  # a previous install that did not finish
    target.parent.mkdir(parents=True, exist_ok=True)
    python = find_python(chain.python)
    logfile = target.parent / f"{name}-install.log"

    def step(args: list[str], what: str) -> None:
        log(what)
        run_logged([str(a) for a in args], logfile, f"installing {name} ({what})")

    step([python, "-m", "venv", str(target)], f"creating a Python {chain.python} environment")
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    step([*pip, "--upgrade", "pip"], "upgrading pip")
    for args in chain.steps:
        step([*pip, *args], f"installing {' '.join(args)}")
    fixes = [f"{fix.__name__}: {', '.join(done) or 'nothing to do'}" for fix in chain.fixes for done in [fix(target)]]
    listed = subprocess.run([str(target / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    record = {"name": name, "python": chain.python, "steps": [list(a) for a in chain.steps], "fixes": fixes,
              "version": versions.get(chain.dist.lower()), "versions": versions}
    atomic_write_json(target / RECORD, record)
    return record


def doctor() -> list[dict]:
    rows = []
    for name, chain in TOOLCHAINS.items():
        record = installed(name)
        try:
            python = find_python(chain.python)
        except SurgeryError:
            python = None
        rows.append({"toolchain": name, "summary": chain.summary, "installed": record is not None,
                     "version": record and record["version"], "path": str(env_dir(name)),
                     "host_python": python, "missing": None if record else f"surgery toolchain install {name}"})
    return rows
