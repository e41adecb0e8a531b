"""`as_matrix`: the rows an analysis reads from a trace (real tokens only), a tensor, or a store, and its errors."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.analysis import as_matrix

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return nm.load("induction-2l")


def test_a_trace_gives_one_row_per_real_token(model):
    trace = model.run(["a b c", "a b c d e f"], capture=[HOOK, "blocks.0.attn.hook_z"])
    rows = as_matrix(trace, HOOK)
    mask = trace.attention_mask.bool()
    assert torch.equal(rows, trace[HOOK][mask].double())
    assert as_matrix(trace, "blocks.0.attn.hook_z").shape == (int(mask.sum()), 128)


def test_tensors_arrays_and_stores_give_their_rows(model, tmp_path):
    x = torch.randn(3, 4, 5)
    assert torch.equal(as_matrix(x), x.reshape(12, 5).double())
    assert torch.equal(as_matrix(x.numpy()), x.reshape(12, 5).double())
    store = nm.extract(model, ["a b c", "d e"], HOOK, tmp_path / "s.h5", progress=False, dtype=torch.float32)
    assert torch.equal(as_matrix(store), store[HOOK][:].double())
    assert torch.equal(as_matrix(store[HOOK]), store[HOOK][:].double())


def test_bad_activations_name_the_problem(model):
    trace = model.run("a b", capture=[HOOK, "blocks.1.hook_resid_post"])
    with pytest.raises(nm.InputError, match="pass hook="):
        as_matrix(trace)
    with pytest.raises(nm.InputError, match="2 NaN or infinite"):
        as_matrix(torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]]))
    with pytest.raises(nm.InputError, match="cannot read activations from a str"):
        as_matrix("acts.h5")
