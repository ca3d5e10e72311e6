import numpy as np
import torch

from surgery.passes.testing import apply_checked, export, ops, run


class Greedy(torch.nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.argmax(logits, dim=-1, keepdim=True)


def test_odd_vocabulary_is_padded_and_the_token_kept():
    model = export(Greedy(), torch.zeros(1, 1001), names=["m_logits"])
    out, sites = apply_checked(model, "argmax_pad")
    assert sites == 1 and ops(out) == ["Pad", "ArgMax"]
    logits = np.full((1, 1001), -3e38, np.float32)  # every real logit near the padding's value
    logits[0, 1000] = -2e38  # the largest is the last real entry, next to the padding
    assert run(out, {"m_logits": logits})[0].item() == 1000
    logits[0, 3] = logits[0, 1000]  # a tie: the first index wins, as before
    assert run(out, {"m_logits": logits})[0].item() == 3


def test_a_multiple_of_64_is_left_alone():
    model = export(Greedy(), torch.zeros(1, 1024), names=["m_logits"])
    out, sites = apply_checked(model, "argmax_pad")
    assert sites == 0 and ops(out) == ["ArgMax"]
