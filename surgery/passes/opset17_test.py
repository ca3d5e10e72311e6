import torch

from surgery.passes.testing import apply_checked, export, ops


class Norm(torch.nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) + b


def test_opset18_reduce_and_split_convert_down():
    model = export(Norm(), torch.randn(1, 3, 8), opset=18)
    out, sites = apply_checked(model, "opset17")
    assert sites >= 2 and next(o.version for o in out.opset_import if o.domain == "") == 17
    reduce = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 1 and any(a.name == "axes" for a in reduce.attribute)


def test_opset17_graph_is_unchanged():
    model = export(Norm(), torch.randn(1, 3, 8), opset=17)
    out, sites = apply_checked(model, "opset17")
    assert sites == 0 and ops(out) == ops(model)
