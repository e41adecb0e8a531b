"""Any torch.nn.Module: module paths are the hook names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuronmap as nm


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))


def test_module_paths_are_hook_names():
    assert nm.load(_mlp()).hook_names == ["0", "1", "2", "2.0"]


def test_capture_by_module_path_matches_hand_computation():
    mlp = _mlp()
    x = torch.randn(5, 4)
    trace = nm.load(mlp).run(x, capture=["1", "2.0"])
    hidden = torch.relu(x @ mlp[0].weight.T + mlp[0].bias)
    torch.testing.assert_close(trace["1"], hidden)
    torch.testing.assert_close(trace["2.0"], hidden @ mlp[2][0].weight.T + mlp[2][0].bias)
    assert torch.equal(trace.logits, mlp(x))


def test_intervene_by_module_path():
    mlp = _mlp()
    x = torch.randn(5, 4)
    trace = nm.load(mlp).run(x, interventions={"1": torch.zeros(())})
    torch.testing.assert_close(trace.logits, mlp[2][0].bias.expand(5, 3))


def test_a_module_taking_token_ids_gets_them_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
    ids = torch.tensor([[1, 2, 3]])
    trace = nm.load(net).run(ids, capture="0")
    assert torch.equal(trace["0"], net[0].weight[ids])
    assert torch.equal(trace.tokens, ids)


def test_a_module_whose_output_is_not_a_tensor_is_a_clear_error():
    class Pair(nn.Module):
        def forward(self, x):
            return {"double": 2 * x}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)["double"]

    with pytest.raises(nm.InterventionError, match="'pair' outputs a dict, not a tensor"):
        nm.load(Net()).run(torch.ones(2), capture="pair")
