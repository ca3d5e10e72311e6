"""Loading several remote-code models in one process (the conformance suite, a notebook, a server): each
load must run its own modeling file. transformers keys remote model classes by config class, and revisions
whose configuration files are byte-identical share one, so without surgery's guard the second revision
silently ran the first one's code."""

from __future__ import annotations

import sys
from pathlib import Path

from surgery.apply import plan_apply, write_plan
from surgery.conformance import load
from surgery.export.exporter import ExportOptions
from surgery.export.source import load_streaming
from surgery.fixtures.qwen_v1 import build
from surgery.packs import ApplyOptions, get_pack


def test_each_revision_runs_its_own_code(tmp_path: Path):
    pack = get_pack("qwen")
    for revision in ("2023-11", "2023-09", "2023-12"):
        src = build(tmp_path / revision / "src", revision=revision)
        model_dir = tmp_path / revision / "m"  # the same basename for every revision, as in a test suite
        write_plan(plan_apply(pack, src, ApplyOptions(seq_length=32, dtype="fp32")), model_dir)
        model = load(model_dir, remote=True)
        loaded = Path(sys.modules[type(model).__module__].__file__).read_bytes()
        assert loaded == (model_dir / "modeling_qwen.py").read_bytes(), revision
        skeleton, _ = load_streaming(model_dir, ExportOptions(seq_length=32, trust_remote_code=True))
        assert sys.modules[type(skeleton.model).__module__].__file__ == sys.modules[type(model).__module__].__file__
