"""Bootstrap intervals against the normal-theory interval and scipy's BCa, and p-value corrections against scipy's
Benjamini–Hochberg and Bonferroni / Holm written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

import neuronmap as nm
from neuronmap.analysis.rigour import Estimate, bootstrap, correct_pvalues, significant
from neuronmap.analysis.similarity import cka


def _normal(n: int = 400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(2.0, 3.0, n)


def test_interval_of_a_normal_mean_is_close_to_mean_plus_minus_1_96_standard_errors():
    x = _normal()
    estimate = bootstrap(np.mean, x, n_resamples=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert estimate.value == pytest.approx(x.mean(), rel=1e-12)
    assert estimate.low == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert estimate.high == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert float(estimate.distribution.std()) == pytest.approx(x.std() / math.sqrt(len(x)), rel=0.1)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    x = _normal()
    a, b = bootstrap(np.mean, x, n_resamples=300, seed=4), bootstrap(np.mean, x, n_resamples=300, seed=4)
    assert (a.low, a.high) == (b.low, b.high) and torch.equal(a.distribution, b.distribution)
    assert bootstrap(np.mean, x, n_resamples=300, seed=5).low != a.low


def test_every_set_is_resampled_with_the_same_rows():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = list(range(50))
    paired = bootstrap(lambda a, b, c: float((b - 2 * a).abs().max() + np.abs(c - a[:, 0].numpy()).max()),
                       x, 2 * x, np.asarray(x[:, 0]), n_resamples=50)
    assert paired.high == 0.0  # the pairing is never broken
    distinct = bootstrap(lambda rows: len(set(rows.tolist())), labels, n_resamples=200)
    assert distinct.high < 50 and distinct.value == 50  # resampling with replacement repeats rows
    assert distinct.distribution.mean() == pytest.approx(50 * (1 - (1 - 1 / 50) ** 50), rel=0.05)


def test_a_paired_measure_such_as_cka_gets_an_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = x @ rng.normal(size=(5, 4)) + rng.normal(size=(60, 4))
    estimate = bootstrap(cka, x, y, n_resamples=40)
    assert estimate.value == pytest.approx(cka(x, y), rel=1e-12)
    assert estimate.low <= estimate.high and 0 < estimate.low < 1


def test_a_trace_and_hook_pair_is_resampled_by_its_rows():
    model = nm.load("induction-2l")
    tokens = torch.randint(0, model.module.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    hook = "blocks.0.hook_resid_post"
    trace = model.run(tokens, capture=hook)
    rows = trace[hook].reshape(30, -1).double()
    estimate = bootstrap(lambda a, t: float((a[:, 0] - t).abs().max()), (trace, hook), rows[:, 0], n_resamples=20)
    assert estimate.high == 0.0  # the trace's rows and the tensor's are resampled together


def test_bca_matches_scipys_bca_interval():
    x = np.random.default_rng(1).lognormal(size=150)  # skewed: BCa and percentile differ
    ours = bootstrap(np.mean, x, n_resamples=4000, interval="bca")
    theirs = scipy.stats.bootstrap((x,), np.mean, method="BCa", n_resamples=4000, rng=0).confidence_interval
    width = theirs.high - theirs.low
    assert ours.low == pytest.approx(theirs.low, abs=0.05 * width)
    assert ours.high == pytest.approx(theirs.high, abs=0.05 * width)
    plain = bootstrap(np.mean, x, n_resamples=4000)
    assert ours.high > plain.high  # the correction moves a right-skewed interval up


def test_estimate_prints_renders_and_converts():
    estimate = Estimate(0.8312, 0.8012, 0.8634, 0.95, 1000, distribution=torch.linspace(0.79, 0.87, 1000))
    assert str(estimate) == "0.83 [0.80, 0.86] 95% CI" and float(estimate) == 0.8312
    assert "\n" not in repr(estimate) and "1,000" in repr(estimate)
    assert np.array_equal(estimate.to_numpy(), [0.8312, 0.8012, 0.8634])
    html = estimate._repr_html_()
    assert "0.83 [0.80, 0.86] 95% CI" in html and "<svg" in html
    assert str(Estimate(0.51234, 0.5101, 0.5149, 0.9, 10)) == "0.512 [0.510, 0.515] 90% CI"


# ------------------------------------------------------------------ corrections


def _pvalues(m: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=m - 20), rng.uniform(0, 1e-3, size=20)])
    p[:5] = p[5]  # ties
    return p


def test_benjamini_hochberg_equals_scipy():
    p = _pvalues()
    np.testing.assert_allclose(correct_pvalues(p, "bh").numpy(), scipy.stats.false_discovery_control(p), rtol=1e-12)


def test_bonferroni_and_holm_equal_their_definitions():
    p = _pvalues(50, 1)
    m = len(p)
    np.testing.assert_allclose(correct_pvalues(p, "bonferroni").numpy(), np.minimum(p * m, 1))
    order = np.argsort(p, kind="stable")
    holm, running = np.empty(m), 0.0
    for rank, i in enumerate(order):  # step-down: the i-th smallest times (m - i + 1), kept monotone
        running = max(running, min(1.0, (m - rank) * p[i]))
        holm[i] = running
    np.testing.assert_allclose(correct_pvalues(p, "holm").numpy(), holm, rtol=1e-12)
    assert (correct_pvalues(p, "holm") <= correct_pvalues(p, "bonferroni")).all()


def test_corrections_keep_the_shape_and_significant_compares_with_alpha():
    p = torch.tensor([[0.001, 0.02], [0.04, 0.9]])
    np.testing.assert_allclose(correct_pvalues(p, "bonferroni").numpy(), [[0.004, 0.08], [0.16, 1.0]], rtol=1e-6)
    assert significant(p, 0.05, "bh").tolist() == [[True, True], [False, False]]  # BH: 0.004, 0.04, 0.0533, 0.9
    assert significant(p, 0.05, "bonferroni").tolist() == [[True, False], [False, False]]


def test_bad_input_is_named():
    x = _normal(20)
    with pytest.raises(nm.InputError, match="unknown correction 'fdr'"):
        correct_pvalues([0.1], "fdr")
    with pytest.raises(nm.InputError, match="1 NaN/inf and 1 outside"):
        correct_pvalues([0.1, float("nan"), 1.5])
    with pytest.raises(nm.InputError, match="unknown interval 'student'"):
        bootstrap(np.mean, x, interval="student")
    with pytest.raises(nm.InputError, match="set 0 has 20 rows and set 1 19"):
        bootstrap(lambda a, b: 0.0, x, x[:-1])
    with pytest.raises(nm.InputError, match="one number"):
        bootstrap(lambda a: a[:2], x, n_resamples=5)
    with pytest.raises(nm.InputError, match="confidence"):
        bootstrap(np.mean, x, confidence=95)
    with pytest.raises(nm.InputError, match="NaN or infinity on"):
        bootstrap(lambda a: float("nan") if len(set(a.tolist())) < 20 else 1.0, x, n_resamples=5)
    with pytest.raises(nm.InputError, match="alpha"):
        significant([0.1], alpha=5)
