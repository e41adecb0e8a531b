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
    assert torch.equal(as_matrix(x.numpy()[:, :, ::-1]), x.flip(-1).reshape(12, 5).double())  # a negative stride
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


def test_a_store_too_large_to_read_whole_names_the_methods_that_stream(model, tmp_path):
    store = nm.extract(model, ["a b c", "d e"], HOOK, tmp_path / "s.h5", progress=False, dtype=torch.float32)
    rows = len(store)
    with pytest.raises(nm.InputError, match=rf"{rows} rows × 128 features .* methods that stream a store: .*pca"):
        as_matrix(store, HOOK, max_bytes=rows * 128 * 8 - 1)
    assert as_matrix(store, HOOK, max_bytes=rows * 128 * 8).shape == (rows, 128)


def test_each_row_has_its_token_in_context(model, tmp_path):
    from neuronmap.analysis.activations import row_tokens, token_contexts

    prompts = ["<script>x</script> a b", "one two three four five six seven"]
    trace = model.run(prompts, capture=[HOOK])
    contexts, ids = token_contexts(trace, HOOK, window=2), row_tokens(trace, HOOK)
    assert len(contexts) == len(ids) == len(as_matrix(trace, HOOK))
    words = [w for tokens in trace.str_tokens for w in tokens]
    assert [c[c.index("[") + 1 : c.rindex("]")] for c in contexts] == words
    second = trace.str_tokens[1]
    assert contexts[len(trace.str_tokens[0]) + 3] == f"…{second[1]}{second[2]}[{second[3]}]{second[4]}{second[5]}…"
    assert ids.tolist() == [i for row, m in zip(trace.tokens, trace.attention_mask) for i in row[m.bool()].tolist()]
    store = nm.extract(model, prompts, HOOK, tmp_path / "s.h5", progress=False, dtype=torch.float32)
    lazy = token_contexts(store, HOOK, window=2)  # made row by row as they are read
    assert len(lazy) == len(contexts) and list(lazy) == contexts and lazy[-1] == contexts[-1]
    assert lazy[3:6] == contexts[3:6]
    assert torch.equal(row_tokens(store, HOOK), ids)
    assert token_contexts(torch.zeros(3, 2)) is None and row_tokens(store[HOOK]) is None
    last = model.run(prompts, capture=[HOOK], capture_positions="last")
    assert token_contexts(last, HOOK) is None
