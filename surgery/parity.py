"""The one parity metric every stage reports: cosine similarity and max-abs difference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Parity:
    graph: str
    output: str
    cosine: float
    max_abs: float

    def as_dict(self) -> dict:
        return {"graph": self.graph, "output": self.output, "cosine": self.cosine, "max_abs": self.max_abs}


def compare(graph: str, output: str, got: np.ndarray, want: np.ndarray) -> Parity:
    a = np.asarray(got, np.float64).ravel()
    b = np.asarray(want, np.float64).ravel()
    if a.shape != b.shape:
        return Parity(graph, output, float("nan"), float("inf"))
    if np.array_equal(a, b):
        return Parity(graph, output, 1.0, 0.0)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom else 0.0
    return Parity(graph, output, cosine, float(np.max(np.abs(a - b))))
