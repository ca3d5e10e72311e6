"""Shared fixtures: tiny Qwen-v1 model directories (both revision styles), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.apply import plan_apply, write_plan
from surgery.fixtures.qwen_v1 import REVISIONS, build
from surgery.packs import ApplyOptions, get_pack

SEQ = 64


@pytest.fixture(scope="session", params=REVISIONS)
def revision(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def qwen_src(tmp_path_factory: pytest.TempPathFactory, revision: str) -> Path:
    """An untouched tiny Qwen-v1 directory (read-only by convention: copy before editing)."""
    return build(tmp_path_factory.mktemp(f"qwen-{revision}") / "model", revision=revision, seed=0)


@pytest.fixture(scope="session")
def qwen_patched(qwen_src: Path) -> Path:
    """The full `qwen` pack applied (fp32, SEQ)."""
    plan = plan_apply(get_pack("qwen"), qwen_src, ApplyOptions(seq_length=SEQ, dtype="fp32"))
    out = qwen_src.with_name("patched")
    write_plan(plan, out)
    return out


@pytest.fixture(scope="session")
def qwen_original(qwen_src: Path) -> Path:
    """Only the load-on-transformers-5 patches: the original model's behaviour, loadable here."""
    pack = get_pack("qwen")
    plan = plan_apply(pack, qwen_src, ApplyOptions(only=pack.load_only))
    out = qwen_src.with_name("original")
    write_plan(plan, out)
    return out

