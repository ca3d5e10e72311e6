"""Patch packs: one short module per model family (installed as `surgery.patches`)."""
