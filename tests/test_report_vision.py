"""A VL conversion's report has a vision section: the image size and preprocessing from the manifest's record,
the tower's graph I/O and position scheme, and its parity at every stage; a text-only report has none."""

from __future__ import annotations

import shutil
from dataclasses import replace
from html.parser import HTMLParser
from types import SimpleNamespace

from test_pack_qwen2_vl import vl  # noqa: F401  (module fixture: the exported tiny Qwen2-VL)

from surgery.manifest import Manifest
from surgery.report import write_report
from surgery.report_vision import vision_markdown


def test_vl_report_has_a_vision_section(vl, tmp_path):  # noqa: F811
    out = tmp_path / "bundle"
    shutil.copytree(vl["onnx"], out / "stages" / "export")  # what convert's export stage leaves
    results = {"export": {"parity": [{"graph": "vision", "output": "image_embeds", "cosine": 0.9999991},
                                     {"graph": "block_0", "output": "hidden_states", "cosine": 0.9999999}]},
               "optimize": {"graphs": {"vision": {"cosine": 0.9999987}}},
               "compile": {"parity": [{"graph": "vision", "output": "image_embeds", "cosine": 0.9999996}]}}
    options = SimpleNamespace(chip="bm1684x", quantize="f16", check="sample")
    write_report(out, results, {"export": 1.0}, options)
    md = (out / "report.md").read_text()
    section = md.split("## Vision")[1].split("## Sizes")[0]
    assert "| image size (height x width) | 56 x 84, fixed in the graph" in section and "bicubic" in section
    assert "pixel_values [24, 1176] float32" in section and "6 embeddings per image" in section
    assert "multimodal RoPE [3, 1, S], sections [2, 3, 3]" in section and "[1, 4, 6]" in section
    assert ("torch -> ONNX 0.9999991, ONNX -> optimized 0.9999987, optimized -> compiled 0.9999996" in section)
    assert "surgery run bundle --image photo.png" in section
    page = (out / "report.html").read_text()
    HTMLParser().feed(page)
    assert "<h2>Vision</h2>" in page and "0.9999996" in page.split("<h2>Vision</h2>")[1]
    options.chip = "ax650"  # a kit: nothing runs it here, so no `surgery run` line
    write_report(out, results, {"export": 1.0}, options)
    assert "## Vision" in (out / "report.md").read_text() and "--image" not in (out / "report.md").read_text()
    text_only = replace(Manifest.read(vl["onnx"]), vision=None)
    assert vision_markdown(text_only, {}, [], "bundle") == []
