import numpy as np
import onnx
import torch

from surgery.passes import PASSES, run_pass
from surgery.passes.testing import export, ops, run


class ComputedRope(torch.nn.Module):
    """RoPE the way transformers computes it: from position_ids and inv_freq, inside the graph."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))

    def forward(self, x, position_ids, attention_mask):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * emb.cos() + rotated * emb.sin() + attention_mask.sum() * 0


def test_decode_rope_becomes_tables_for_every_slot():
    model = export(ComputedRope(), torch.randn(1, 1, 16), torch.zeros(1, 1, dtype=torch.int64),
                   torch.zeros(1, 1, 1, 9), names=["x", "position_ids", "attention_mask"])
    out, sites = run_pass(model, PASSES["rope_tables"])
    assert sites == 2 and "Cos" not in ops(out) and "Sin" not in ops(out)
    tables = [i for i in out.graph.initializer if len(i.dims) == 3 or (len(i.dims) >= 2 and i.dims[0] == 9)]
    assert tables and all(t.dims[0] == 9 for t in tables)  # positions 0..8: the mask's 9 slots
    x = np.random.default_rng(0).standard_normal((1, 1, 16)).astype(np.float32)
    mask = np.zeros((1, 1, 1, 9), np.float32)
    for p in range(9):
        feeds = {"x": x, "position_ids": np.array([[p]], np.int64), "attention_mask": mask}
        np.testing.assert_allclose(run(out, feeds)[0], run(model, feeds)[0], atol=1e-6)


def test_graph_without_computed_rope_is_unchanged():
    model = export(torch.nn.Linear(4, 4), torch.randn(1, 4))
    out, sites = run_pass(model, PASSES["rope_tables"])
    assert sites == 0 and out is model and isinstance(out, onnx.ModelProto)
