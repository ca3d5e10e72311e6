"""Chip adapters that turn exported graphs into device models (installed as `surgery.compile`)."""
