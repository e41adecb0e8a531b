"""Neuron entropy and mutual information with labels: against numpy histograms, scikit-learn's `mutual_info_score` on
the same bins and its `mutual_info_classif`; the permutation test on planted and independent neurons."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import scipy.stats
import sklearn.feature_selection
import sklearn.metrics
import torch

import neuronmap as nm
from neuronmap.analysis.information import mutual_information, neuron_entropy


def _planted(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Columns 0-1 depend on a 3-class label (0 strongly, 1 weakly), columns 2-7 are independent noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8))
    x[:, 0] += 2 * y
    x[:, 1] += 0.6 * y
    return x, y


def _equal_width_codes(column: np.ndarray, bins: int) -> np.ndarray:
    low, high = column.min(), column.max()
    return np.clip(np.floor((column - low) / (high - low) * bins), 0, bins - 1).astype(int)


# ------------------------------------------------------------------ entropy


def test_entropy_equals_numpys_histogram_entropy_in_bits():
    x, _ = _planted()
    x[:, 7] = 1.5  # constant: one bin, no uncertainty
    entropy = neuron_entropy(x, bins=20)
    for j in range(7):
        counts, _ = np.histogram(x[:, j], bins=20)
        assert entropy[j] == pytest.approx(scipy.stats.entropy(counts, base=2), rel=1e-12)
    assert entropy[7] == 0
    uniform = np.tile(np.arange(8.0), 50)[:, None]  # 8 equally frequent values in 8 bins: 3 bits
    assert neuron_entropy(uniform, bins=8)[0] == pytest.approx(3.0, rel=1e-12)


def test_entropy_streams_a_store_to_the_in_memory_result(tmp_path):
    model = nm.load("induction-2l")
    tokens = torch.randint(0, model.module.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.mlp.hook_post"
    store = nm.extract(model, tokens, hook, tmp_path / "s.h5", dtype=torch.float32, progress=False)
    whole = neuron_entropy(store[hook][:], bins=16)
    for batch_size in (5, 64, 1000):
        assert torch.equal(neuron_entropy(store, hook, bins=16, batch_size=batch_size), whole)


# ------------------------------------------------------------------ mutual information


def test_binned_mi_equals_sklearn_mutual_info_score_on_the_same_bins():
    x, y = _planted()
    result = mutual_information(torch.from_numpy(x), y, bins=12)
    for j in range(x.shape[1]):
        reference = sklearn.metrics.mutual_info_score(y, _equal_width_codes(x[:, j], 12)) / math.log(2)
        assert result.mi[j] == pytest.approx(reference, rel=1e-10, abs=1e-12)
    assert result.p_values is None and result.top(2).indices.tolist() == [0, 1]


def test_a_neuron_equal_to_the_label_shares_all_of_its_entropy():
    rng = np.random.default_rng(0)
    y = rng.choice(["cat", "dog", "fish", "bird"], size=400, p=[0.4, 0.3, 0.2, 0.1])
    codes = np.unique(y, return_inverse=True)[1]
    frequencies = np.bincount(codes) / len(y)
    h_y = float(-(frequencies * np.log2(frequencies)).sum())
    x = np.stack([codes.astype(float), rng.normal(size=400)], axis=1)
    result = mutual_information(x, y, bins=8)
    assert result.label_entropy == pytest.approx(h_y, rel=1e-12)
    assert result.mi[0] == pytest.approx(h_y, rel=1e-12)
    assert result.mi[1] < 0.1


def test_knn_mi_is_sklearns_mutual_info_classif_in_bits():
    x, y = _planted(300)
    result = mutual_information(x, y, method="knn", k=4, seed=2)
    nats = sklearn.feature_selection.mutual_info_classif(x, y, discrete_features=False, n_neighbors=4, random_state=2)
    np.testing.assert_allclose(result.mi.numpy(), nats / math.log(2), rtol=1e-12)
    assert result.top(1).indices.tolist() == [0]


def test_permutation_p_values_find_planted_neurons_and_not_independent_ones():
    x, y = _planted()
    result = mutual_information(x, y, bins=10, permutations=199, seed=1)
    assert result.significant(0.05).tolist() == [0, 1]  # after Benjamini-Hochberg over the 8 neurons
    assert (result.corrected[2:] > 0.05).all() and result.p_values[0] == pytest.approx(1 / 200)
    np.testing.assert_allclose(result.corrected.numpy(), scipy.stats.false_discovery_control(result.p_values.numpy()))
    # each p-value is the share of shuffles (plus the observed labelling) at least as informative, by hand
    rng = np.random.default_rng(1)
    shuffled = [y[rng.permutation(len(y))] for _ in range(199)]
    codes = _equal_width_codes(x[:, 3], 10)
    observed = sklearn.metrics.mutual_info_score(y, codes)
    hits = sum(sklearn.metrics.mutual_info_score(s, codes) >= observed - 1e-12 for s in shuffled)
    assert result.p_values[3] == pytest.approx((1 + hits) / 200)


def test_a_trace_and_labels_per_token(tmp_path):
    model = nm.load("induction-2l")
    tokens = torch.randint(0, model.module.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    hook = "blocks.0.hook_resid_post"
    trace = model.run(tokens, capture=hook)
    labels = (tokens.flatten() % 2).numpy()  # parity of the current token: readable from the residual stream
    result = mutual_information(trace, labels, hook, bins=6)
    assert result.name == hook and len(result.mi) == trace[hook].shape[-1]
    rows = trace[hook].reshape(-1, trace[hook].shape[-1]).double().numpy()
    reference = sklearn.metrics.mutual_info_score(labels, _equal_width_codes(rows[:, 5], 6)) / math.log(2)
    assert result.mi[5] == pytest.approx(reference, rel=1e-10)


def test_the_result_renders_bounded_and_escaped():
    x, y = _planted()
    x = np.concatenate([x, np.random.default_rng(0).normal(size=(600, 300))], axis=1)
    result = mutual_information(x, y, bins=8, permutations=19)
    result.name = "<b>layer</b>"
    html = result._repr_html_()
    assert "<b>layer" not in html and "&lt;b&gt;layer" in html
    assert html.count("<tr>") == 21 and "bh" in html and len(html) < 30_000
    assert "\n" not in repr(result) and isinstance(result.figure(), go.Figure)
    assert set(result.to_numpy()) == {"mi", "p_values", "corrected"}


# ------------------------------------------------------------------ bad input


def test_bad_input_is_named():
    x, y = _planted(50)
    with pytest.raises(nm.InputError, match="49 labels for 50 rows"):
        mutual_information(x, y[:-1])
    with pytest.raises(nm.InputError, match="at least 2 classes"):
        mutual_information(x, np.zeros(50, dtype=int))
    with pytest.raises(nm.InputError, match="unknown method 'kde'"):
        mutual_information(x, y, method="kde")
    with pytest.raises(nm.InputError, match="unknown correction 'fdr'"):
        mutual_information(x, y, correction="fdr")
    with pytest.raises(nm.InputError, match="bins"):
        neuron_entropy(x, bins=1)
    bad = x.copy()
    bad[3, 2] = np.inf
    with pytest.raises(nm.InputError, match="1 NaN or infinite"):
        mutual_information(bad, y)
    with pytest.raises(nm.InputError, match="1 NaN or infinite"):
        neuron_entropy(bad)
    with pytest.raises(nm.InputError, match="labels hold 1 NaN"):
        mutual_information(x, np.where(np.arange(50) == 0, np.nan, 1.0))
    with pytest.raises(nm.InputError, match="permutations > 0"):
        mutual_information(x, y).significant()
