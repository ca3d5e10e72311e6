import numpy as np
import torch
from onnx import numpy_helper

from surgery.passes.testing import apply_checked, export


def test_finfo_min_becomes_minus_10000():
    class Masked(torch.nn.Module):
        def forward(self, x):
            return (x + torch.triu(torch.full((4, 4), torch.finfo(torch.float32).min), 1)).softmax(-1)

    out, sites = apply_checked(export(Masked(), torch.randn(1, 4, 4)), "mask_constant")
    values = [numpy_helper.to_array(a.t) for n in out.graph.node for a in n.attribute if a.name == "value"]
    values += [numpy_helper.to_array(t) for t in out.graph.initializer]
    assert sites == 1 and min(v.min() for v in values if v.dtype == np.float32) == -10000.0
