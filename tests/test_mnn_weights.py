"""MNN's block-quantized weight storage as compile/mnn_weights.py writes it, decoded here by the rules MNN's
loaders follow (written out in this test, not taken from the module): values `q + 2^(b-1)` packed high bits
first, row-major; scales per (row, block); asymmetric pairs (zero, scale) with w = (v - 2^(b-1)) * scale + zero.
That MNN itself reads them so is tests/test_mnn_llm.py's engine check."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import decode_mnn_linear as decode

from surgery.compile.mnn_weights import block_for, header, write_linear


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, False), (8, True)])
def test_values_decode_within_half_a_step(bits: int, symmetric: bool):
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 96), torch.randn(40)
    file = io.BytesIO(b"\x00" * 7)  # what MNNConvert wrote before: offsets start after it
    file.seek(0, io.SEEK_END)
    external, wide = write_linear(file, weight, bias, bits, 32, symmetric)
    assert external[0] == 7 and not wide
    w, b = decode(file.getvalue(), external, 40, 96, bits, 32)
    blocks = weight.reshape(40, 3, 32)
    top = (1 << (bits - 1)) - 1
    step = (blocks.abs().amax(-1) / top if symmetric else (blocks.amax(-1) - blocks.amin(-1)) / (2 * top + 1))
    error = (torch.from_numpy(w).reshape(40, 3, 32) - blocks).abs().amax(-1)
    assert bool((error <= step / 2 + 1e-6).all())
    assert np.array_equal(b, bias.numpy())
    assert external[1] == len(header(40, 96, bits)[0]) + 40 * 96 * bits // 8


def test_header_and_blocks():
    small, wide = header(64, 896, 4)
    assert small[0] == 2 and np.frombuffer(small[1:5], "<u2").tolist() == [64, 896] and not wide
    assert np.frombuffer(small[5:], np.int8).tolist() == [16, *range(-8, 8)]
    chatglm, wide = header(65024, 4096, 4)  # past int16: MNN reads the two dims as uint16
    assert not wide and np.frombuffer(chatglm[1:5], "<u2").tolist() == [65024, 4096]
    big, wide = header(151936, 4096, 8)
    assert wide and np.frombuffer(big[1:9], "<i4").tolist() == [151936, 4096] and big[9] == 0 and len(big) == 266
    assert block_for(4864, 64) == 64 and block_for(100, 64) == 4 and block_for(96, 0) == 96
