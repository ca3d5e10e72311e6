"""The report's vision section for a VL conversion: what the `vision` graph takes (image size, preprocessing,
patch layout, image tokens, position scheme), taken from the manifest's record so the reader sees what a
runtime will do to a photo, and the tower's parity at every stage beside the language model's graphs."""

from __future__ import annotations

import html

from surgery.manifest import Manifest


def vision_facts(manifest: Manifest) -> list[tuple[str, str]]:
    """(what, value) rows of the manifest's vision record; empty for a text-only model."""
    v = manifest.vision
    if v is None:
        return []
    graph = manifest.graph(v["graph"])
    height, width = v["image_size"]
    mrope = manifest.conventions.get("mrope")
    rows = [
        ("image size (height x width)", f"{height} x {width}, fixed in the graph; other images are resized with "
                                        f"the processor's {v.get('resample', '?')} filter"),
        ("preprocessing", f"x * {v.get('rescale_factor', '?')}, minus mean {v.get('image_mean')}, over std "
                          f"{v.get('image_std')}"),
        ("graph input", f"{graph.inputs[0].name} {graph.inputs[0].shape} {graph.inputs[0].dtype}"
                        + (f", patch {v['patch_size']}, temporal patch {v['temporal_patch_size']}, merge "
                           f"{v['merge_size']}" if "merge_size" in v else "")),
        ("graph output", f"{graph.outputs[0].name} {graph.outputs[0].shape}: {v['tokens']} embeddings per image"),
        ("image tokens", f"id {v['image_token_id']} repeated {v['tokens']} times between "
                         f"{v.get('vision_start_token_id')} and {v.get('vision_end_token_id')}"),
        ("positions", f"multimodal RoPE [3, 1, S], sections {mrope['sections']}" if mrope else "one row [1, S]"),
    ]
    if "grid_thw" in v:
        rows.insert(3, ("patch grid (t, h, w)", str(v["grid_thw"])))
    return rows


def vision_markdown(manifest: Manifest, table: dict[str, dict[str, float]], stages: list[tuple[str, str]],
                    bundle: str, chip: str | None = None) -> list[str]:
    """Markdown lines of the section (none for a text-only model); the `run --image` line only where the
    chip's output runs on this machine."""
    facts = vision_facts(manifest)
    if not facts:
        return []
    name = manifest.vision["graph"]
    row = table.get(name, {})
    lines = ["## Vision", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), "",
             f"Parity of the `{name}` graph (worst output cosine): "
             + ", ".join(f"{label} {row[s]:.7f}" if s in row else f"{label} -" for s, label in stages) + ".", ""]
    if chip is None or _runs_here(chip):
        lines += [f"Run it with an image: `surgery run {bundle} --image photo.png --prompt \"Describe it\"`.", ""]
    return lines


def _runs_here(chip: str) -> bool:
    from surgery.compile.registry import adapter_for

    return adapter_for(chip).runtime is not None


def vision_html(manifest: Manifest, table: dict[str, dict[str, float]], stages: list[tuple[str, str]]) -> str:
    """The same section as HTML ('' for a text-only model)."""
    facts = vision_facts(manifest)
    if not facts:
        return ""
    name = manifest.vision["graph"]
    row = table.get(name, {})
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts)
    parity = ", ".join(f"{html.escape(label)} {row[s]:.7f}" if s in row else f"{html.escape(label)} -"
                       for s, label in stages)
    return (f"<h2>Vision</h2><table>{body}</table><p>Parity of the <code>{html.escape(name)}</code> graph (worst "
            f"output cosine): {parity}.</p>")
