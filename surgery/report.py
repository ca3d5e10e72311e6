"""report.md and report.html (one self-contained file): what was patched, the block contract, similarity
at every stage per graph (a chart of 1 - cosine, log scale), sizes, and time per stage."""

from __future__ import annotations

import html
import math
from pathlib import Path

from surgery.fsutil import atomic_write_text
from surgery.manifest import Manifest
from surgery.report_vision import vision_html, vision_markdown
from surgery.source_quant import report_lines

STAGES = [("export", "torch -> ONNX"), ("optimize", "ONNX -> optimized"), ("compile", "optimized -> compiled")]
COLORS = {"export": "#4c78a8", "optimize": "#f58518", "compile": "#54a24b"}


def similarity(results: dict) -> dict[str, dict[str, float]]:
    """Worst cosine per graph at each stage."""
    table: dict[str, dict[str, float]] = {}

    def put(stage: str, graph: str, cosine: float | None) -> None:
        if cosine is not None and not math.isnan(cosine):
            row = table.setdefault(graph, {})
            row[stage] = min(cosine, row.get(stage, 1.0))

    for row in results.get("export", {}).get("parity", []):
        put("export", row["graph"], row["cosine"])
    for graph, info in results.get("optimize", {}).get("graphs", {}).items():
        put("optimize", graph, info["cosine"])
    for row in results.get("compile", {}).get("parity", []):
        if row["output"] not in ("token", "tokens"):
            put("compile", row["graph"], row["cosine"])
    return table


def chart(table: dict[str, dict[str, float]]) -> str:
    """Grouped bars of 1 - cosine per graph and stage on a log axis (1e-9 .. 1): taller means more lost."""
    graphs = list(table)
    width, height, left, bottom = max(480, 70 * len(graphs) + 80), 300, 60, 70
    plot_h = height - bottom - 20
    lo, hi = -9, 0

    def y(loss: float) -> float:
        exponent = min(max(math.log10(max(loss, 10 ** lo)), lo), hi)
        return 20 + plot_h * (1 - (exponent - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">']
    for e in range(lo, hi + 1, 3):
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y(10 ** e):.1f}" y2="{y(10 ** e):.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(10 ** e) + 4:.1f}" text-anchor="end">1e{e}</text>')
    parts.append(f'<text x="12" y="{20 + plot_h / 2}" transform="rotate(-90 12 {20 + plot_h / 2})" '
                 'text-anchor="middle">1 - cosine</text>')
    group = (width - left - 10) / max(len(graphs), 1)
    bar = group / (len(STAGES) + 1)
    for i, graph in enumerate(graphs):
        x0 = left + i * group + bar / 2
        for j, (stage, label) in enumerate(STAGES):
            if stage not in table[graph]:
                continue
            loss = 1 - table[graph][stage]
            top = y(loss)
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{top:.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{20 + plot_h - top:.1f}" fill="{COLORS[stage]}"><title>{html.escape(graph)} '
                         f'{label}: cosine {table[graph][stage]:.7f}</title></rect>')
        parts.append(f'<text x="{x0 + group / 2 - bar / 2:.1f}" y="{height - bottom + 14}" text-anchor="end" '
                     f'transform="rotate(-35 {x0 + group / 2 - bar / 2:.1f} {height - bottom + 14})">'
                     f'{html.escape(graph)}</text>')
    for j, (stage, label) in enumerate(STAGES):
        parts.append(f'<rect x="{left + j * 150}" y="4" width="10" height="10" fill="{COLORS[stage]}"/>'
                     f'<text x="{left + j * 150 + 14}" y="13">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def running_it(out: Path, options) -> str:
    """Which vendor runtime loads this bundle on the board, and what runs it on this machine."""
    from surgery.compile.registry import adapter_for

    adapter = adapter_for(options.chip)
    here = f"`surgery run {out.name} --prompt \"Hello\"`" if adapter.runtime else "nothing on this machine"
    return f"On the board: {adapter.loaded_by}. Here: {here}."


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def write_report(out: Path, results: dict, timings: dict[str, float], options,
                 peaks: dict[str, dict[str, float]] | None = None) -> None:
    export = Manifest.read(out / "stages" / "export")
    table = similarity(results)
    files = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("report."))
    patches = results.get("apply", {}).get("patches", [])
    title = (f"{export.model_type} ({export.architecture}) for {options.chip}, {options.quantize}, "
             f"seq {export.seq_length}, checks: {options.check}")
    peaks = peaks or {}
    stage_rows = [[s, f"{t:.1f}", *(f"{peaks.get(s, {}).get(k, 0):,.0f}" for k in ("tree", "process"))]
                  for s, t in timings.items()]
    stage_head = ["stage", "seconds", "peak RSS, process tree (MB)", "peak RSS, largest process (MB)"]

    runs_on = running_it(out, options)
    source = report_lines(results.get("compile", {}).get("source"))
    md = [f"# surgery convert: {title}", "", "## Running it", "", runs_on, "", *source,
          "## Time and memory per stage", "", "| " + " | ".join(stage_head) + " |", "|---|---|---|---|"]
    md += ["| " + " | ".join(r) + " |" for r in stage_rows]
    md += ["", "## Similarity per graph (worst output cosine)", "",
           "| graph | " + " | ".join(label for _, label in STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    md += [f"| {g} | " + " | ".join(f"{row[s]:.7f}" if s in row else "-" for s, _ in STAGES) + " |"
           for g, row in table.items()]
    md += ["", *vision_markdown(export, table, STAGES, out.name, options.chip)]  # VL: the tower, its preprocessing
    md += ["", "## Sizes", "", "| file | bytes |", "|---|---|"] + [f"| {p.name} | {_size(p):,} |" for p in files]
    md += ["", "## Block contract", "", "| graph | inputs | outputs |", "|---|---|---|"]
    md += [f"| {g.name} | " + ", ".join(f"{t.name} {t.shape} {t.dtype}" for t in g.inputs) + " | "
           + ", ".join(f"{t.name} {t.shape}" for t in g.outputs) + " |" for g in export.graphs]
    md += ["", f"Mask: additive {export.conventions['mask']['value']}; KV layout {export.conventions['kv_layout']}.",
           "", "## Patches", "", "| patch | outcome | rule / reason |", "|---|---|---|"]
    md += [f"| {p['patch']} | {p['outcome']} | {p['rule'] or p['detail']} |" for p in patches]
    md += ["", "```diff", results.get("apply", {}).get("diff", "").rstrip(), "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))

    def rows(header: list[str], items: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in items)
        return f"<table><tr>{head}</tr>{body}</table>"

    def cell(row: dict, stage: str) -> str:
        if stage not in row:
            return "<td>-</td>"
        return f'<td class="{"bad" if row[stage] < 0.99 else ""}">{row[stage]:.7f}</td>'

    similarity_rows = "".join(f"<tr><td>{html.escape(g)}</td>" + "".join(cell(row, s) for s, _ in STAGES) + "</tr>"
                              for g, row in table.items())
    similarity_head = "".join(f"<th>{label}</th>" for _, label in STAGES)
    contract = rows(["graph", "inputs", "outputs"], [
        [g.name, ", ".join(f"{t.name} {t.shape} {t.dtype}" for t in g.inputs),
         ", ".join(f"{t.name} {t.shape}" for t in g.outputs)] for g in export.graphs])
    sections = [
        f"<h1>surgery convert</h1><p>{html.escape(title)}</p>",
        f"<h2>Running it</h2><p>{html.escape(runs_on)}</p>",
        *([f"<h2>Source checkpoint</h2><p>{'<br>'.join(html.escape(x) for x in source[2:] if x)}</p>"]
          if source else []),
        "<h2>Similarity at every stage</h2><p>Per graph, the worst output's 1 - cosine against the stage before "
        "(lower is better; hover a bar for the value).</p>" + chart(table),
        f"<table><tr><th>graph</th>{similarity_head}</tr>{similarity_rows}</table>",
        vision_html(export, table, STAGES),
        "<h2>Time and memory per stage</h2>" + rows(stage_head, stage_rows),
        "<h2>Sizes</h2>" + rows(["file", "bytes"], [[p.name, f"{_size(p):,}"] for p in files]),
        "<h2>Block contract</h2>" + contract,
        "<h2>Patches</h2>" + rows(["patch", "outcome", "rule / reason"],
                                  [[p["patch"], p["outcome"], p["rule"] or p["detail"]] for p in patches]),
        "<details><summary>unified diff</summary><pre>"
        + html.escape(results.get("apply", {}).get("diff", "")) + "</pre></details>",
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
             "pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}.bad{background:#fdd}")
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    atomic_write_text(out / "report.html", page)
