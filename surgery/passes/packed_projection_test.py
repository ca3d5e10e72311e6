import numpy as np
import torch

from surgery.passes import PASSES, run_pass
from surgery.passes.testing import apply_checked, export, feeds_for, ops, run

HIDDEN = 16


class Packed(torch.nn.Module):
    """Baichuan's attention input: one W_pack projection, unflattened and picked apart by index."""

    def __init__(self, read_whole: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.W_pack = torch.nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.read_whole = read_whole

    def forward(self, x: torch.Tensor):
        proj = self.W_pack(x)
        parts = proj.unflatten(-1, (3, HIDDEN)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = parts[0], parts[1], parts[2]
        out = (q * k, v.reshape(1, -1, 2, HIDDEN // 2))
        return (*out, proj) if self.read_whole else out


def slimmed(module: torch.nn.Module, x: torch.Tensor):
    """As the pipelines run it: after slim has folded the exporter's shape arithmetic into constants."""
    return run_pass(export(module, x), PASSES["slim"])[0]


def test_each_part_becomes_its_own_projection_exactly():
    model = slimmed(Packed(), torch.randn(1, 5, HIDDEN))
    assert ops(model).count("MatMul") == 1 and "Gather" in ops(model)
    out, sites = apply_checked(model, "packed_projection", min_cosine=0.9999999)
    assert sites == 1 and ops(out).count("MatMul") == 3 and "Gather" not in ops(out)
    assert np.array_equal(run(out, feeds_for(out))[0], run(model, feeds_for(model))[0])
    folded = run_pass(out, PASSES["slim"])[0]  # the column slices of the weight become weights of their own
    weights = {tuple(t.dims) for t in folded.graph.initializer if len(t.dims) == 2}
    assert weights == {(HIDDEN, HIDDEN)} and "Slice" not in ops(folded)


def test_left_alone_when_the_packed_output_is_read_whole():
    model = slimmed(Packed(read_whole=True), torch.randn(1, 5, HIDDEN))
    assert run_pass(model, PASSES["packed_projection"])[1] == 0


def test_left_alone_when_a_gather_is_not_a_column_slice():
    class Rows(torch.nn.Module):  # picks rows (positions) of the output, not a slice of its columns
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)

        def forward(self, x: torch.Tensor):
            y = self.proj(x).reshape(3, 2, HIDDEN)
            return y[0] + y[1]

    model = slimmed(Rows(), torch.randn(3, HIDDEN))
    assert ops(model).count("Gather") == 2 and "Reshape" in ops(model)
    out, sites = run_pass(model, PASSES["packed_projection"])
    assert sites == 0 and out.SerializeToString() == model.SerializeToString()


def test_a_sealed_weight_is_sliced_in_the_graph():
    """optimize seals external weights into graph inputs; the pass slices them there, never reading them."""
    from surgery.onnxio import seal

    model = slimmed(Packed(), torch.randn(1, 5, HIDDEN))
    for t in model.graph.initializer:  # as if the weights lived in a data file
        if len(t.dims) == 2:
            t.data_location = 1
            del t.external_data[:]
            t.external_data.add(key="location", value="w.data")
    seal(model)
    assert any(len(i.type.tensor_type.shape.dim) == 2 for i in model.graph.input)
    out, sites = run_pass(model, PASSES["packed_projection"])
    assert sites == 1 and ops(out).count("Slice") == 3 and ops(out).count("MatMul") == 3
