import torch

from surgery.passes.testing import apply_checked, export, ops


def repeat_kv(x, n):
    b, kv, t, d = x.shape
    return x[:, :, None].expand(b, kv, n, t, d).reshape(b, kv * n, t, d)


class DecodeAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
        return torch.matmul(scores.softmax(-1), v)


def test_decode_gqa_drops_the_copies():
    args = (torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.zeros(1, 1, 1, 6))
    out, sites = apply_checked(export(DecodeAttention(), *args), "gqa_grouped")
    assert sites == 1 and "Expand" not in ops(out)


def test_prefill_is_left_alone():
    args = (torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.zeros(1, 1, 3, 3))
    assert apply_checked(export(DecodeAttention(), *args), "gqa_grouped")[1] == 0
