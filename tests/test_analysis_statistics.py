"""Per-neuron statistics, layer summaries and cross-layer correlation, each against numpy / scipy computed here; the
streamed store path against the in-memory one."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import scipy.stats
import torch

import neuronmap as nm
from neuronmap.analysis.statistics import (
    cross_layer_correlation,
    layer_summary,
    neuron_correlation,
    neuron_statistics,
)

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def model():
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.module.config.vocab_size, (10, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def store(model, tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "s.h5"
    return nm.extract(model, tokens, HOOKS, path, dtype=torch.float32, progress=False)


def _skewed(n: int = 600, seed: int = 0) -> np.ndarray:
    """Columns of varied shape: log-normal, ReLU'd normal (many exact zeros), a constant, a near-zero-mean normal."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.lognormal(size=n), np.maximum(rng.normal(size=n), 0), np.full(n, 3.25),
                  rng.normal(size=n) * 1e-3 + 5, rng.standard_t(3, size=n)], axis=1)
    return x


# ------------------------------------------------------------------ per-neuron statistics


def test_neuron_statistics_equal_numpy_and_scipy():
    x = _skewed()
    stats = neuron_statistics(torch.from_numpy(x), zero_threshold=0.1)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std.numpy(), x.std(0), rtol=1e-10, atol=1e-15)
    np.testing.assert_array_equal(stats.sparsity.numpy(), (np.abs(x) <= 0.1).mean(0))
    np.testing.assert_array_equal(stats.min.numpy(), x.min(0))
    np.testing.assert_array_equal(stats.max.numpy(), x.max(0))
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # scipy warns about the constant column
        skew, kurt = scipy.stats.skew(x, axis=0), scipy.stats.kurtosis(x, axis=0)
    assert math.isnan(stats.skewness[2]) and math.isnan(skew[2])  # constant neuron: undefined in both
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(stats.skewness.numpy()[keep], skew[keep], rtol=1e-9)
    np.testing.assert_allclose(stats.kurtosis.numpy()[keep], kurt[keep], rtol=1e-9)


def test_a_trace_gives_the_statistics_of_its_real_tokens(model, tokens):
    trace = model.run(tokens[:3], capture=HOOKS[0])
    rows = trace[HOOKS[0]].reshape(-1, trace[HOOKS[0]].shape[-1]).double().numpy()
    stats = neuron_statistics(trace, HOOKS[0])
    assert stats.rows == len(rows) and stats.name == HOOKS[0]
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.kurtosis.numpy(), scipy.stats.kurtosis(rows, axis=0), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 100_000])
def test_streamed_store_equals_in_memory_to_1e_10(store, batch_size):
    for hook in (HOOKS[0], HOOKS[2]):
        whole = neuron_statistics(store[hook][:].double())
        streamed = neuron_statistics(store, hook, batch_size=batch_size)
        viewed = neuron_statistics(store[hook], batch_size=batch_size)
        assert streamed.rows == whole.rows == len(store)
        for name, expected in whole.to_numpy().items():
            for result in (streamed, viewed):
                np.testing.assert_allclose(result.to_numpy()[name], expected, rtol=1e-10, atol=1e-10, err_msg=name)


def test_the_store_is_read_block_by_block_never_whole(store, monkeypatch):
    view = store[HOOKS[0]]
    spans = []
    read = type(view).read
    monkeypatch.setattr(type(view), "read", lambda self, a, b: spans.append((a, b)) or read(self, a, b))
    monkeypatch.setattr(type(view), "__getitem__", lambda *_: pytest.fail("the whole hook was read"))
    neuron_statistics(store, HOOKS[0], batch_size=50)
    assert spans == [(a, min(a + 50, len(store))) for a in range(0, len(store), 50)]


def test_top_ranks_neurons_like_argsort():
    x = _skewed()
    stats = neuron_statistics(x, zero_threshold=0.0)
    assert stats.top("std", 2).indices.tolist() == list(np.argsort(-x.std(0))[:2])
    assert stats.top("sparsity", 1).indices.tolist() == [1]  # the ReLU'd column is the sparsest
    assert stats.top("mean", 5, largest=False).indices.tolist() == list(np.argsort(x.mean(0))[:5])
    assert stats.top("skewness", 5).indices.tolist()[-1] == 2  # NaN (constant neuron) comes last
    with pytest.raises(nm.InputError, match="unknown statistic 'loudness'"):
        stats.top("loudness")


def test_statistics_render_bounded_and_escaped():
    stats = neuron_statistics(torch.randn(200, 3000, generator=torch.Generator().manual_seed(1)), hook=None)
    stats.name = "<script>alert(1)</script>"
    html = stats._repr_html_()
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert len(html) < 60_000 and "\n" not in repr(stats)
    assert html.count("<tr>") == 7 + 1 + 3 * (10 + 1)  # summary table and three top-10 tables, with header rows
    assert isinstance(stats.figure("std"), go.Figure)
    assert set(stats.to_numpy()) == {"mean", "std", "sparsity", "skewness", "kurtosis", "min", "max"}


# ------------------------------------------------------------------ layer summaries


def _effective_rank(matrix: np.ndarray) -> float:
    s = np.linalg.svd(matrix - matrix.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_and_norms_equal_numpy_by_hand(model, tokens, store):
    trace = model.run(tokens[:4], capture=HOOKS)
    summary = layer_summary(trace, "blocks.*.hook_resid_post")
    assert summary.names == HOOKS[:2]
    for i, hook in enumerate(HOOKS[:2]):
        rows = trace[hook].reshape(-1, trace[hook].shape[-1]).double().numpy()
        norms = np.linalg.norm(rows, axis=1)
        assert summary.norm_mean[i] == pytest.approx(norms.mean(), rel=1e-10)
        assert summary.norm_std[i] == pytest.approx(norms.std(), rel=1e-8)
        assert summary.effective_rank[i] == pytest.approx(_effective_rank(rows), rel=1e-10)
    streamed = layer_summary(store, HOOKS, batch_size=37)
    assert sorted(streamed.names) == sorted(HOOKS)
    for i, hook in enumerate(streamed.names):
        rows = store[hook][:].double().numpy()
        assert streamed.effective_rank[i] == pytest.approx(_effective_rank(rows), rel=1e-9)
        assert streamed.norm_mean[i] == pytest.approx(np.linalg.norm(rows, axis=1).mean(), rel=1e-10)


def test_effective_rank_of_planted_low_rank_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 40))  # rank 3: effective rank at most 3
    rank = layer_summary({"low": x}).effective_rank[0]
    assert 1 < rank <= 3 + 1e-9 and rank == pytest.approx(_effective_rank(x), rel=1e-9)


def test_a_planted_outlier_dimension_is_found():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32))
    x[:, 5] = 20 + rng.normal(size=2000)  # mean |x| about 25 times a normal feature's 0.8
    x[:, 17] *= 4  # 4 times: under the default factor of 6
    summary = layer_summary({"resid": x, "plain": x[:, :5]})
    assert summary.outliers == {"resid": [5], "plain": []}
    assert layer_summary({"resid": x}, outlier_factor=3).outliers["resid"] == [5, 17]
    html = summary._repr_html_()
    assert "5 (2" in html and "none" in html
    assert isinstance(summary.figure(), go.Figure)


# ------------------------------------------------------------------ cross-layer correlation


def test_cross_layer_correlation_equals_numpy_corrcoef(model, tokens):
    trace = model.run(tokens[:4], capture=HOOKS)
    result = cross_layer_correlation(trace, HOOKS)
    assert sorted(result.names) == sorted(HOOKS)  # in the trace's order
    mats = [trace[h].reshape(-1, trace[h].shape[-1]).double().numpy() for h in result.names]
    for i, a in enumerate(mats):
        for j, b in enumerate(mats):
            with np.errstate(all="ignore"):
                full = np.corrcoef(np.concatenate([a, b], axis=1).T)[: a.shape[1], a.shape[1]:]
            live = a.std(0) > 0
            expected = np.nanmax(np.abs(full), axis=1)[live].mean()
            assert result.values[i, j] == pytest.approx(expected, rel=1e-9), (i, j)
    assert torch.allclose(result.values.diagonal(), torch.ones(3, dtype=torch.float64))


def test_neuron_correlation_equals_corrcoef_with_nan_for_constant_neurons():
    x = _skewed(300)
    y = np.random.default_rng(3).normal(size=(300, 4))
    with np.errstate(all="ignore"):
        expected = np.corrcoef(np.concatenate([x, y], 1).T)[:5, 5:]
    np.testing.assert_allclose(neuron_correlation(x, y).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert neuron_correlation(x).shape == (5, 5) and torch.isnan(neuron_correlation(x)[2]).all()


def test_constant_neurons_are_left_out_of_the_cross_layer_mean():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    b = np.concatenate([a[:, :1] * 2 + 1, np.zeros((400, 1))], axis=1)  # matches a's first neuron; one dead neuron
    values = cross_layer_correlation({"a": a, "b": b}).values
    assert values[1, 0] == pytest.approx(1.0)  # only b's live neuron counts, and a matches it exactly
    with np.errstate(all="ignore"):
        assert values[0, 1] == pytest.approx(np.mean([1, *np.abs(np.corrcoef(a.T)[0, 1:])]), rel=1e-9)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_named():
    x = np.random.default_rng(0).normal(size=(10, 3))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(nm.InputError, match="1 NaN or infinite"):
        neuron_statistics(bad)
    with pytest.raises(nm.InputError, match="zero_threshold"):
        neuron_statistics(x, zero_threshold=-1)
    with pytest.raises(nm.InputError, match="batch_size"):
        neuron_statistics(x, batch_size=0)
    with pytest.raises(nm.InputError, match="at least 2 activation sets"):
        cross_layer_correlation({"a": x})
    with pytest.raises(nm.InputError, match="'a' has 10 rows and 'b' 9"):
        cross_layer_correlation({"a": x, "b": x[:9]})
    with pytest.raises(nm.InputError, match="outlier_factor"):
        layer_summary({"a": x}, outlier_factor=0)
    with pytest.raises(nm.InputError, match="mapping"):
        layer_summary(x)


def test_a_store_of_several_hooks_needs_hook(store):
    with pytest.raises(nm.InputError, match="pass hook="):
        neuron_statistics(store)
