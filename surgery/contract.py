"""The block contract's runtime side in one place: the masks a runtime feeds and inputs that follow them.

Export, verify, optimize, every adapter's parity check and the reference runtime all build masks and test
inputs; they take them from here so no stage writes the mask constant or the slot rules on its own.
"""

from __future__ import annotations

import numpy as np

from surgery.manifest import MASK_VALUE, GraphSpec

SAMPLING = {"top_p": 0.8, "temperature": 0.7, "penalty": 1.1, "top_k": 50}
DECODE_POSITION = 6  # parity inputs for decode graphs: a token at position 6 with 6 valid history slots


def prefill_mask(seq: int, length: int, dtype: np.dtype | str = np.float32) -> np.ndarray:
    """[1,1,SEQ,SEQ]: 0 where key j <= query i < length, else the mask value."""
    rows = np.arange(seq)
    keep = (rows[None, :] <= rows[:, None]) & (rows[:, None] < length)
    return np.where(keep, 0.0, MASK_VALUE)[None, None].astype(dtype)


def decode_mask(seq: int, position: int, dtype: np.dtype | str = np.float32) -> np.ndarray:
    """[1,1,1,SEQ+1]: history slots below `position` and the last slot (the new token) are visible."""
    slots = np.arange(seq + 1)
    return np.where((slots < position) | (slots == seq), 0.0, MASK_VALUE)[None, None, None].astype(dtype)


def random_inputs(graph: GraphSpec, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that follow the contract: ids in range, positions in order, a causal or decode mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph.inputs:
        if t.name == "input_ids":
            value = rng.integers(0, vocab, t.shape)
        elif t.name in SAMPLING:
            value = np.full(t.shape, SAMPLING[t.name])
        elif t.name == "position_ids":
            # [1, S], or [3, 1, S] under multimodal RoPE (the three components equal: a text-only prompt)
            value = (np.broadcast_to(np.arange(t.shape[-1]), t.shape) if graph.kind == "block"
                     else np.full(t.shape, DECODE_POSITION))
        elif t.name == "attention_mask" and graph.kind == "block":
            value = prefill_mask(t.shape[-1], t.shape[-1])
        elif t.name == "attention_mask":
            value = decode_mask(t.shape[-1] - 1, DECODE_POSITION)
        else:
            value = rng.standard_normal(t.shape)
        feeds[t.name] = value.astype(t.dtype)
    return feeds
