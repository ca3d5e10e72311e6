"""Regenerate the README's performance tables from the benches' JSON figures, so no figure there is typed by
hand. Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers.

    .venv/bin/python bench/vs_llm_convert.py --json build/bench/vs_llm_convert.json
    .venv/bin/python bench/vs_llmexport.py --json build/bench/vs_llmexport.json
    .venv/bin/python bench/readme_tables.py build/bench/vs_llm_convert.json build/bench/vs_llmexport.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LABELS = {"surgery (check none)": "`surgery convert{c} --check none`",
          "surgery (check sample)": "`surgery convert{c}` (`--check sample`)",
          "llm_convert": "TPU-MLIR `llm_convert`", "llmexport": "MNN `llmexport`"}


def _ratio(value: float, base: float, is_base: bool) -> str:
    return "" if is_base else f" ({value / base:.2f}x)"


def table(fig: dict) -> str:
    base = fig["rows"][fig["base"]]
    sophgo = fig["bench"] == "vs_llm_convert"
    what = (f"{fig['chip']} {fig['quantize']} g{fig['group']}" if sophgo
            else f"MNN {fig['bits']}-bit block {fig['block']}")
    cols = ["wall", "peak RSS, process tree", "bmodel bytes" if sophgo else "output bytes"]
    cols += ["device weight memory"] if sophgo else []
    lines = [f"{fig['shape']} x {fig['layers']} layers, seq {fig['seq']}, measured {fig['date']} "
             f"(`bench/{fig['bench']}.py`):", "", f"| {what} | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for label, row in fig["rows"].items():
        is_base = label == fig["base"]
        cells = [f"{row['wall']:.1f} s{_ratio(row['wall'], base['wall'], is_base)}",
                 f"{row['tree_mb']:,.0f} MB{_ratio(row['tree_mb'], base['tree_mb'], is_base)}",
                 f"{row['bytes']:,}{_ratio(row['bytes'], base['bytes'], is_base)}"]
        if sophgo:
            cells.append(f"{row['device_weight']:,}{_ratio(row['device_weight'], base['device_weight'], is_base)}")
        name = LABELS.get(label, label).format(c="" if sophgo else " -c mnn")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace(readme: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", type=Path, nargs="+", help="JSON files the benches wrote with --json")
    parser.add_argument("--readme", type=Path, default=Path(__file__).parents[1] / "README.md")
    args = parser.parse_args()
    readme = args.readme.read_text()
    for path in args.figures:
        fig = json.loads(path.read_text())
        readme = replace(readme, fig["bench"], table(fig))
    args.readme.write_text(readme)
    print(f"updated {args.readme} from {', '.join(map(str, args.figures))}")


if __name__ == "__main__":
    main()
