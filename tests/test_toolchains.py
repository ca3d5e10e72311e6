"""Toolchain environments: doctor reports every toolchain; installed ones really import and run."""

from __future__ import annotations

import subprocess

import pytest

from surgery.compile.toolchains import TOOLCHAINS, doctor, installed, python_of
from surgery.errors import SurgeryError


def test_doctor_lists_every_toolchain_with_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("SURGERY_HOME", str(tmp_path))
    rows = doctor()
    assert [r["toolchain"] for r in rows] == list(TOOLCHAINS)
    assert all(not r["installed"] and r["missing"] == f"surgery toolchain install {r['toolchain']}" for r in rows)
    with pytest.raises(SurgeryError, match="run `surgery toolchain install sophgo`"):
        python_of("sophgo")


@pytest.mark.skipif(installed("rknn") is None, reason="rknn toolchain absent: run `surgery toolchain install rknn`")
def test_rknn_toolkit_imports_in_its_own_environment():
    done = subprocess.run([str(python_of("rknn")), "-c", "from rknn.api import RKNN; RKNN(verbose=False)"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
