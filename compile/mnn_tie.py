"""Tied embeddings for MNN's engine: the head's quantized rows in llm.mnn.weight serve as the embedding."""

from __future__ import annotations


def tie_embeddings(graph: dict, bits: int, block: int) -> list[int] | None:
    return None
