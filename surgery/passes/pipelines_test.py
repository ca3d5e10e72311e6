"""Every pipeline names passes that exist, and every workaround names a pass that exists (or says how export
avoids it) and evidence that is in this repository."""

from pathlib import Path

from surgery.passes import PASSES
from surgery.passes.pipelines import TARGETS
from surgery.passes.workarounds import WORKAROUNDS

ROOT = Path(__file__).resolve().parents[2]


def test_every_pipeline_name_is_a_registered_pass():
    missing = {(target, name) for target, spec in TARGETS.items() for name in spec["passes"] if name not in PASSES}
    assert not missing


def test_passes_are_discovered_from_their_modules():
    modules = {p.stem for p in Path(__file__).parent.glob("*.py")
               if not p.stem.endswith("_test") and p.stem not in ("__init__", "base", "pipelines", "workarounds",
                                                                   "testing", "final_norm")}
    assert {"slim", "rmsnorm", "rope_tables", "opset17"} <= modules
    assert len(PASSES) >= len(modules)  # rmsnorm registers two


def test_workarounds_point_at_passes_and_evidence_we_have():
    for w in WORKAROUNDS:
        assert (w.avoided_by in PASSES) if w.avoided_by else w.note, w.id
        path = w.evidence.split("::")[0].split(" ")[0]
        assert (ROOT / path).is_file(), w.evidence
