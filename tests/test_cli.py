"""A few true end-to-end runs of the `surgery` console script (each pays Python + torch start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SURGERY = str(Path(sys.executable).with_name("surgery"))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([SURGERY, *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_fixture_apply_dry_run_and_json(tmp_path: Path):
    assert run("fixture", "qwen", "--out", "tiny", "--revision", "2023-12", cwd=tmp_path).returncode == 0
    dry = run("apply", "qwen", "--model", "tiny", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "+SUPPORT_TORCH2 = False" in dry.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    done = run("apply", "qwen", "--model", "tiny", "--seq-length", "64", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["out"] == "tiny-surgery" and report["changed"]
    assert {p["patch"]: p["rule"] for p in report["patches"]}["causal-mask"] == "tril causal mask (2023-12)"
    again = run("apply", "qwen", "--model", "tiny-surgery", "--seq-length", "64", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to change" in again.stdout


def test_september_revision_applies_and_says_what_it_lacks(tmp_path: Path):
    """2023-09 remote code has no SUPPORT_TORCH2: `sdpa-off` is not applicable, with its reason, not an abort."""
    assert run("fixture", "qwen", "--out", "sep", "--revision", "2023-09", cwd=tmp_path).returncode == 0
    done = run("apply", "qwen", "--model", "sep", "--seq-length", "64", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    patches = {p["patch"]: p for p in json.loads(done.stdout)["patches"]}
    assert (patches["sdpa-off"]["outcome"], patches["attention-mask"]["outcome"]) == ("not applicable", "applied")
    assert patches["sdpa-off"]["detail"] == "this revision predates SDPA support (no SUPPORT_TORCH2 flag)"


def test_list_json_describes_packs(tmp_path: Path):
    listed = run("list", "--json", cwd=tmp_path)
    assert listed.returncode == 0
    qwen = next(p for p in json.loads(listed.stdout) if p["name"] == "qwen")
    ids = [p["id"] for p in qwen["patches"]]
    assert ids[:7] == ["sdpa-off", "sdpa-branch", "full-divisor", "causal-mask", "attention-mask", "rotary-input",
                       "present-kv"]
    assert all(p["summary"] for p in qwen["patches"])


def test_bad_input_one_line_no_traceback(tmp_path: Path):
    result = run("apply", "qwen", "--model", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: model directory nowhere does not exist; pass the folder "
                                                  "that holds config.json"]
    assert "Traceback" not in result.stderr


def test_every_command_has_help_with_example(tmp_path: Path):
    for command in ("apply", "list", "fixture", "export", "verify", "run", "port"):
        result = run(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Example: surgery " in result.stdout


def test_export_verify_run_end_to_end(tmp_path: Path):
    assert run("fixture", "qwen", "--out", "tiny", cwd=tmp_path).returncode == 0
    applied = run("apply", "qwen", "--model", "tiny", "--seq-length", "32", "--dtype", "fp32", cwd=tmp_path)
    assert applied.returncode == 0
    refused = run("export", "tiny-surgery", "--out", "g", "--seq-length", "32", cwd=tmp_path)
    assert refused.returncode == 2 and "pass --trust-remote-code" in refused.stderr
    assert not (tmp_path / "g" / "manifest.json").exists()
    done = run("export", "tiny-surgery", "--out", "g", "--seq-length", "32", "--trust-remote-code", "--json",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "block_cache_1.onnx" in json.loads(done.stdout)["graphs"]
    checked = run("verify", "g", "--trust-remote-code", "--json", cwd=tmp_path)
    assert checked.returncode == 0 and min(r["cosine"] for r in json.loads(checked.stdout)) >= 0.99999
    text = run("run", "g", "--prompt", "Hello, how are you?", "--chat", "--max-new-tokens", "8", "--json",
               cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    result = json.loads(text.stdout)
    assert len(result["tokens"]) == 8 and isinstance(result["text"], str) and result["prompt_tokens"] > 5
    too_long = run("run", "g", "--prompt-ids", ",".join(["5"] * 40), cwd=tmp_path)
    assert too_long.returncode == 2 and "the prompt has 40 tokens; this export takes 1 to 31" in too_long.stderr


def test_apply_auto_and_port(tmp_path: Path):
    assert run("fixture", "qwen2", "--out", "q2", cwd=tmp_path).returncode == 0
    done = run("apply", "auto", "--model", "q2", "--json", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["pack"] == "qwen2"
    config = json.loads((tmp_path / "q2-surgery" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_qwen2.Qwen2ForCausalLM"}
    (tmp_path / "q2" / "config.json").write_text(json.dumps({**config, "model_type": "olmo3"}))
    unknown = run("apply", "auto", "--model", "q2", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no pack handles model_type 'olmo3'; the closest is 'olmo2'" in unknown.stderr
    assert "`surgery port olmo3 --like olmo2`" in unknown.stderr
    ported = run("port", "olmo3", "--like", "llama", "--dest", "proj", cwd=tmp_path)
    assert ported.returncode == 0, ported.stderr
    pack = (tmp_path / "proj" / "patches" / "olmo3.py").read_text()
    assert 'architecture="Olmo3ForCausalLM"' in pack
    compile(pack, "olmo3.py", "exec")
    compile((tmp_path / "proj" / "tests" / "test_pack_olmo3.py").read_text(), "t.py", "exec")
    again = run("port", "olmo3", "--like", "llama", "--dest", "proj", cwd=tmp_path)
    assert again.returncode == 2 and "pass --force" in again.stderr
