import torch

from surgery.passes.testing import apply_checked, export, ops


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_rmsnorm_fuses_to_one_node():
    model = export(RMSNorm(), torch.randn(1, 4, 16))
    out, sites = apply_checked(model, "rmsnorm")
    assert sites == 1 and ops(out) == ["RMSNormalization"]
    assert next(o.version for o in out.opset_import if o.domain == "") == 23


def test_rmsnorm17_keeps_opset_and_drops_pow():
    model = export(RMSNorm(), torch.randn(1, 4, 16))
    out, sites = apply_checked(model, "rmsnorm17")
    assert sites == 1 and "Pow" not in ops(out) and "Reciprocal" in ops(out)
    assert next(o.version for o in out.opset_import if o.domain == "") == 17


def test_layernorm_like_mean_is_left_alone():
    model = export(torch.nn.LayerNorm(16), torch.randn(1, 4, 16))
    out, sites = apply_checked(model, "rmsnorm")
    assert sites == 0 and out is model
