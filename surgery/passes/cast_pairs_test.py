import torch

from surgery.passes.testing import apply_checked, export, ops


def test_lossless_round_trip_goes_lossy_stays():
    class Casts(torch.nn.Module):
        def forward(self, x):
            lossless = x.to(torch.float64).to(torch.float32)
            lossy = x.to(torch.float16).to(torch.float32)
            return lossless + lossy

    out, sites = apply_checked(export(Casts(), torch.randn(2, 3)), "cast_pairs", min_cosine=0.999)
    assert sites == 1 and ops(out).count("Cast") == 2
