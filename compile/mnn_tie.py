"""Tied embeddings for MNN's engine: the head's quantized rows in `llm.mnn.weight` double as the embedding.

With `tie_embeddings = [weight_offset, alpha_offset, alpha_size, bits, block]` in llm_config.json the engine
reads a token's embedding as row `token` of the head's packed weights (transformers/llm/engine/src/
diskembedding.cpp, DiskEmbedding constructor and `embedding`), so no `embeddings_bf16.bin` is shipped
(vocab x hidden x 2 bytes: 272 MB for Qwen2-0.5B). What MNNConvert wrote for the head must then be what that
reader decodes:
- weights: MNNConvert's block quantization stores a linear map (IDSTEncoder.hpp `GetWeightSet`), so the
  packed values are `q + 2^(bits-1)`, `bits` wide, high bits first: the reader's `q41_dequant_ref` order.
  They follow a header (dims, shape, map) inside the op's `external` range.
- scales, asymmetric: MNNConvert stores (min, scale) pairs with the quanParameter's `aMin = -2^(bits-1)`;
  the conv loader turns them into (min - aMin*scale, scale) (source/core/ConvolutionCommon.cpp, the
  `clampMin` adjustment), the form the embedding reader expects as it is on disk. So the pairs are rewritten
  in that form in the weight file and `aMin` set to 1, which the loader leaves alone: the head computes the
  same logits, and the embedding reader sees its own convention. Symmetric scales need nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def head_op(graph: dict, vocab: int, hidden: int) -> dict | None:
    """The Convolution MNNConvert made of the head's product (vocab outputs from hidden inputs), last one."""
    heads = [op for op in graph["oplists"] if op.get("type") == "Convolution"
             and op["main"]["common"].get("outputCount") == vocab and op["main"]["common"].get("inputCount") == hidden]
    return heads[-1] if heads else None


def tie_embeddings(graph: dict, weight_file: Path, vocab: int, hidden: int, bits: int, block: int) -> list[int] | None:
    """Make the head's rows readable as the embedding (in place: `graph` and `weight_file`), and return the
    `tie_embeddings` entry; None when the head is not stored in a form the engine's reader takes."""
    op = head_op(graph, vocab, hidden)
    quan = op and op["main"].get("quanParameter")
    external = op and op["main"].get("external")
    if not quan or not external or quan.get("aMaxOrBits") != bits or hidden % block:
        return None
    packed, blocks = vocab * hidden * bits // 8, hidden // block
    header, alpha_size = external[1] - packed, external[2]
    if not 0 < header < 64 or alpha_size not in (vocab * blocks * 4, vocab * blocks * 8):
        return None  # another storage (sparse, fp16 scales, ...): ship the bf16 table instead
    offset, alpha_offset = external[0] + header, external[0] + external[1]
    if alpha_size == vocab * blocks * 8 and quan.get("aMin", 0) < 0:  # asymmetric: (min, scale) -> loader form
        alpha = np.memmap(weight_file, dtype="<f4", mode="r+", offset=alpha_offset, shape=(vocab * blocks, 2))
        alpha[:, 0] -= quan["aMin"] * alpha[:, 1]
        alpha.flush()
        del alpha
        quan["aMin"] = 1
    return [offset, alpha_offset, alpha_size, bits, block]
