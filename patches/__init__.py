"""Patch packs (installed as `surgery.patches`): one short pack module per model family, each defining `PACK`,
and rule libraries named `*_rules.py` (rules, matchers, pack factories) that define no pack."""
