import numpy as np
import torch

from surgery.passes.rotate_half import rotation
from surgery.passes.testing import apply_checked, export, ops


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


class Rope(torch.nn.Module):
    def forward(self, x, cos, sin):
        return x * cos + rotate_half(x) * sin


class EinopsStyle(torch.nn.Module):
    def forward(self, x, cos, sin):
        x1, x2 = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(dim=-2)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rotation_matrix_is_rotate_half():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert np.array_equal(x @ rotation(8, np.float32), rotate_half(torch.from_numpy(x)).numpy())


def test_slices_and_split_forms_become_matmul():
    args = (torch.randn(1, 2, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    for module in (Rope(), EinopsStyle()):
        out, sites = apply_checked(export(module, *args), "rotate_half")
        assert sites == 1 and "Neg" not in ops(out) and "MatMul" in ops(out)


def test_concat_of_unrelated_halves_is_left_alone():
    class NotRope(torch.nn.Module):
        def forward(self, a, b):
            return torch.cat((-a[..., 8:], b[..., :8]), dim=-1)

    model = export(NotRope(), torch.randn(1, 16), torch.randn(1, 16))
    assert apply_checked(model, "rotate_half")[1] == 0
