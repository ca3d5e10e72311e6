"""compile/tpumlir_codes.py: weights on a per-group 4/8-bit grid are read back as codes, scales and zero
points that reproduce them bit for bit (GPTQ's groups that never use code 0 or 15 included), anything else
is left alone, and a top MLIR's MatMuls on such weights become A16MatMuls on those codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.compile.tpumlir_codes import grid_codes, hand_over, pack
from surgery.fixtures.gptq import calibration, gptq

GROUP = 32


def dequantized(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> np.ndarray:
    """[K, N] float32 as the checkpoint reader computes it (export/dequant.py), columns sorted by group."""
    g = g_idx.long()
    w = ((codes - zeros[g]).float() * scales.float()[g])  # [K, N]
    return w[torch.argsort(g, stable=True)].numpy()


@pytest.fixture(scope="module")
def gptq_weight() -> np.ndarray:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=gen, dtype=torch.float64) * 0.02
    return dequantized(*gptq(w, calibration(128, 256, gen), GROUP))


def test_gptq_weights_come_back_bit_for_bit(gptq_weight: np.ndarray):
    groups = gptq_weight.T.reshape(48, -1, GROUP)
    levels = np.array([len(np.unique(g)) for g in groups.reshape(-1, GROUP)])
    assert (levels < 16).any()  # some groups use fewer than all 16 codes: min/max would re-grid them
    codes, scales, zeros = grid_codes(gptq_weight, GROUP, 4)
    assert codes.max() <= 15 and zeros.max() <= 15
    g = np.arange(128) // GROUP
    again = (codes.astype(np.float32) - zeros[:, g]) * scales[:, g]
    np.testing.assert_array_equal(again.T, gptq_weight)


@pytest.mark.parametrize("values,scale", [([1, 3, 5], 0.5), ([2, 4, 6, 8], 0.25), ([0, 15], 1.0), ([7], 0.125)])
def test_sparse_and_one_sided_groups(values: list[int], scale: float):
    """Codes {1, 3, 5} (smallest difference two steps), only even codes, only positive weights, a constant."""
    rng = np.random.default_rng(0)
    codes = rng.choice(values, size=(GROUP, 4))
    weight = (codes * scale).astype(np.float32)  # zero point 0: every weight >= 0
    found = grid_codes(weight, GROUP, 4)
    assert found is not None
    back, s, z = found
    np.testing.assert_array_equal(((back.astype(np.float32) - z[:, [0]]) * s[:, [0]]).T, weight)


def test_weights_off_any_grid_are_left_alone():
    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    assert grid_codes(weight, GROUP, 4) is None
    assert grid_codes(weight, 48, 4) is None  # groups that do not divide K


def test_pack_puts_the_even_input_in_the_low_nibble():
    assert pack(np.array([[1, 2, 15, 0]], dtype=np.uint8), 4).tolist() == [[0x21, 0x0F]]


MLIR = """#loc = loc(unknown)
module @block_0 attributes {module.chip = "ALL", module.state = "TOP_F32", module.weight_file = "w.npz"} {
  func.func @main(%arg0: tensor<1x4x128xf32> loc(unknown)) -> (tensor<1x4x48xf32>) {
    %0 = "top.None"() : () -> none loc(#loc)
    %1 = "top.Input"(%arg0) {channel_format = "nchw"} : (tensor<1x4x128xf32>) -> tensor<1x4x128xf32> loc(#loc1)
    %2 = "top.Weight"() : () -> tensor<128x48xf32> loc(#loc2)
    {matmul_q}
    %4 = "top.Weight"() : () -> tensor<48x48xf32> loc(#loc4)
    {matmul_f}
    return %5 : tensor<1x4x48xf32> loc(#loc)
  } loc(#loc)
} loc(#loc)
#loc1 = loc("x")
#loc2 = loc("block.q_proj.weight.T")
#loc3 = loc("q")
#loc4 = loc("block.float.weight.T")
#loc5 = loc("y")
"""
MATMUL = ('{out} = "top.MatMul"({x}, {w}, %0) {{do_relu = false, right_transpose = false}} : '
          '({tx}, tensor<{k}x48xf32>, none) -> tensor<1x4x48xf32> loc({loc})')


def test_matmuls_on_the_grid_become_a16matmuls(gptq_weight: np.ndarray, tmp_path: Path):
    mlir = tmp_path / "block_0.mlir"
    mlir.write_text(MLIR.replace("{matmul_q}", MATMUL.format(out="%3", x="%1", w="%2", tx="tensor<1x4x128xf32>", k=128,
                                                             loc="#loc3"))
                    .replace("{matmul_f}", MATMUL.format(out="%5", x="%3", w="%4", tx="tensor<1x4x48xf32>", k=48,
                                                         loc="#loc5")))
    other = np.random.default_rng(0).standard_normal((48, 48)).astype(np.float32)
    np.savez(tmp_path / "w.npz", **{"block.q_proj.weight.T": gptq_weight, "block.float.weight.T": other})
    assert hand_over(mlir, GROUP, 4) == ["block.q_proj.weight.T"]
    text = mlir.read_text()
    assert text.count('"top.A16MatMul"') == 1 and text.count('"top.MatMul"') == 1  # the float one stays
    assert ('"top.A16MatMul"(%1, %q3, %s3, %z3, %0) {q_group_size = 32 : i64, right_transpose = true, '
            'weight_bits = 4 : i64} : (tensor<1x4x128xf32>, tensor<48x64xui8>, tensor<48x4xf32>, '
            'tensor<48x4xui8>, none) -> tensor<1x4x48xf32> loc(#loc3)') in text
    arrays = dict(np.load(tmp_path / "w.npz"))
    codes, scales, zeros = grid_codes(gptq_weight, GROUP, 4)
    np.testing.assert_array_equal(arrays["block.q_proj.weight.T_codes"], pack(codes, 4))
    np.testing.assert_array_equal(arrays["block.q_proj.weight.T_scales"], scales)
    np.testing.assert_array_equal(arrays["block.q_proj.weight.T_zeros"], zeros)
    assert '#codes_q3 = loc("block.q_proj.weight.T_codes")' in text
