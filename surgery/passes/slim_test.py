import torch

from surgery.passes.testing import apply_checked, export


def test_slim_folds_constants():
    class Foldable(torch.nn.Module):
        def forward(self, x):
            return x * (torch.ones(4) * 2 + 1).sum()

    model = export(Foldable(), torch.randn(2, 4))
    out, sites = apply_checked(model, "slim")
    assert sites > 0 and len(out.graph.node) < len(model.graph.node)
