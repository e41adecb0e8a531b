"""Similarity measures (CKA, RSA, CCA family, Procrustes), each against a reference written here or scipy's, and the
`SimilarityMatrix` they fill."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

import neuronmap as nm
from neuronmap.analysis.similarity import (
    cca,
    cka,
    layer_similarity,
    minibatch_cka,
    pwcca,
    procrustes,
    rdm,
    rsa,
    similarity_matrix,
    svcca,
)


def _data(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def _rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------ references written out in full


def _gram_cka(k: np.ndarray, l: np.ndarray) -> float:
    """Kornblith et al. (2019) eq. 3 in its n × n Gram form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, by explicit sums over index tuples of distinct i, j, q, r (small n only)."""
    n = len(k)
    t1 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / math.perm(n, 4)
    t3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)) / math.perm(n, 3)
    return t1 + t2 - 2 * t3


def _rbf(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * sigma**2))


# ------------------------------------------------------------------ CKA


def test_linear_cka_equals_the_gram_formula_in_both_of_its_computations():
    x, y = _data(40, 6, 0), _data(40, 9, 1) + _data(40, 6, 0) @ _data(6, 9, 2)
    expected = _gram_cka(x @ x.T, y @ y.T)
    assert cka(x, y) == pytest.approx(expected, rel=1e-10)  # n >> d: feature space
    wide_x, wide_y = _data(8, 50, 3), _data(8, 40, 4)  # d >> n: Gram matrices
    assert cka(wide_x, wide_y) == pytest.approx(_gram_cka(wide_x @ wide_x.T, wide_y @ wide_y.T), rel=1e-10)


def test_cka_is_one_for_itself_and_invariant_to_rotation_and_isotropic_scaling():
    x, y = _data(60, 8, 5), _data(60, 8, 6)
    assert cka(x, x) == pytest.approx(1, abs=1e-12)
    moved = 7.5 * x @ _rotation(8, 7) + 3.0  # rotation, scale and a shift
    assert cka(x, moved) == pytest.approx(1, abs=1e-10)
    assert cka(moved, y) == pytest.approx(cka(x, y), rel=1e-10)
    assert cka(x, y) < 0.5  # unrelated sets are not similar
    squashed = x * np.array([10.0] + [1.0] * 7)  # anisotropic scaling does change it
    assert cka(x, squashed) < 0.99


def test_rbf_cka_equals_the_hand_hsic_with_the_median_bandwidth():
    x, y = _data(25, 4, 8), np.tanh(_data(25, 4, 8) @ _data(4, 3, 9))
    median = lambda m: np.median(scipy.spatial.distance.pdist(m))  # noqa: E731
    expected = _gram_cka(_rbf(x, median(x)), _rbf(y, median(y)))
    assert cka(x, y, kernel="rbf") == pytest.approx(expected, rel=1e-10)
    assert cka(x, y, kernel="rbf", sigma=0.7) == pytest.approx(_gram_cka(_rbf(x, 0.7), _rbf(y, 0.7)), rel=1e-10)


def test_debiased_cka_equals_the_hand_unbiased_hsic():
    x, y = _data(7, 3, 10), _data(7, 3, 10) + 0.5 * _data(7, 3, 11)
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    expected = _unbiased_hsic(k, l) / math.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l, l))
    assert cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-9)  # feature space
    wide = np.hstack([x, 1e-3 * _data(7, 40, 12)])  # Gram path, then the RBF kernel
    kw = (wide - wide.mean(0)) @ (wide - wide.mean(0)).T
    expected_wide = _unbiased_hsic(kw, l) / math.sqrt(_unbiased_hsic(kw, kw) * _unbiased_hsic(l, l))
    assert cka(wide, y, debiased=True) == pytest.approx(expected_wide, rel=1e-9)
    kr, lr = _rbf(x, 1.3), _rbf(y, 1.3)
    expected_rbf = _unbiased_hsic(kr, lr) / math.sqrt(_unbiased_hsic(kr, kr) * _unbiased_hsic(lr, lr))
    assert cka(x, y, kernel="rbf", sigma=1.3, debiased=True) == pytest.approx(expected_rbf, rel=1e-9)


def test_minibatch_cka_converges_to_full_cka_as_batches_grow():
    x = _data(4000, 10, 13)
    y = np.tanh(x @ _data(10, 12, 14)) + 0.5 * _data(4000, 12, 15)
    full = cka(x, y, debiased=True)
    assert minibatch_cka(x, y, batch_size=4000) == pytest.approx(full, rel=1e-10)
    for batch_size in (8, 64, 1000, 2000):  # unbiased HSIC per batch: close even for tiny batches
        assert minibatch_cka(x, y, batch_size=batch_size) == pytest.approx(full, abs=3e-3)
    # averaging each batch's plain (biased) CKA instead drifts far from it for small batches
    assert np.mean([cka(x[i : i + 8], y[i : i + 8]) for i in range(0, 4000, 8)]) - full > 0.1


def test_minibatch_cka_streams_two_hooks_of_a_store(tmp_path):
    model = nm.load("induction-2l")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    tokens = torch.randint(0, model.module.config.vocab_size, (12, 16), generator=torch.Generator().manual_seed(0))
    store = nm.extract(model, tokens, hooks, tmp_path / "s.h5", dtype=torch.float32, progress=False)
    a, b = (store[h][:].double().numpy() for h in hooks)
    expected = np.mean([_feature_unbiased(a[i : i + 50], b[i : i + 50]) for i in range(0, len(a), 50)], axis=0)
    streamed = minibatch_cka(*hooks, store=store, batch_size=50)
    assert len(a) % 50 >= 4  # the last, short batch counts too
    assert streamed == pytest.approx(expected[0] / math.sqrt(expected[1] * expected[2]), rel=1e-9)
    assert minibatch_cka(store[hooks[0]], store[hooks[1]], batch_size=50) == pytest.approx(streamed, rel=1e-12)
    assert minibatch_cka(store[hooks[0]], b, batch_size=50) == pytest.approx(streamed, rel=1e-12)
    with pytest.raises(nm.InputError, match=f"and y {len(b) - 1}"):
        minibatch_cka(store[hooks[0]], b[:-1])


def _feature_unbiased(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac, bc = a - a.mean(0), b - b.mean(0)
    k, l = ac @ ac.T, bc @ bc.T
    return np.array([_fast_unbiased(k, l), _fast_unbiased(k, k), _fast_unbiased(l, l)])


def _fast_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) eq. 5 in matrix form (checked against the explicit sums above by the debiased test)."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    total = np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one
    return total / (n * (n - 3))


def test_fast_unbiased_reference_matches_the_explicit_sums():
    k, l = (lambda a: a @ a.T)(_data(6, 2, 16)), (lambda a: a @ a.T)(_data(6, 3, 17))
    assert _fast_unbiased(k, l) == pytest.approx(_unbiased_hsic(k, l), rel=1e-10)


# ------------------------------------------------------------------ RSA


@pytest.mark.parametrize("metric", ["correlation", "cosine", "euclidean"])
def test_rdms_equal_scipy_pdist(metric):
    x = _data(12, 5, 18)
    expected = scipy.spatial.distance.pdist(x, metric)
    np.testing.assert_allclose(rdm(x, metric).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(rdm(x, metric, square=True).numpy(), scipy.spatial.distance.squareform(expected))


def test_rsa_spearman_equals_scipy_and_kendall_is_tau_a():
    x, y = _data(15, 6, 19), _data(15, 6, 19) + _data(15, 6, 20)
    a, b = scipy.spatial.distance.pdist(x, "euclidean"), scipy.spatial.distance.pdist(y, "euclidean")
    result = rsa(x, y, metric="euclidean", permutations=0)
    assert result.correlation == pytest.approx(scipy.stats.spearmanr(a, b).statistic, rel=1e-12)
    assert math.isnan(result.p_value)
    # τ_a with ties: rounded RDMs, every pair counted in the denominator
    xt, yt = np.round(_data(7, 2, 21), 0), np.round(_data(7, 2, 21) + 0.7 * _data(7, 2, 22), 0)
    at, bt = scipy.spatial.distance.pdist(xt, "cityblock"), scipy.spatial.distance.pdist(yt, "cityblock")
    assert len(set(at)) < len(at)  # there are ties, so τ_a differs from τ_b
    sign = lambda v: (v[:, None] > v[None]).astype(float) - (v[:, None] < v[None])  # noqa: E731
    from neuronmap.analysis.similarity import _kendall_tau_a

    m = len(at)
    expected = np.triu(sign(at) * sign(bt), 1).sum() / (m * (m - 1) / 2)
    assert _kendall_tau_a(at, bt) == pytest.approx(expected, rel=1e-12)
    assert abs(expected - scipy.stats.kendalltau(at, bt).statistic) > 1e-3
    xe, ye = _data(9, 3, 23), _data(9, 3, 23) + 0.3 * _data(9, 3, 24)
    ae, be = scipy.spatial.distance.pdist(xe, "cosine"), scipy.spatial.distance.pdist(ye, "cosine")
    me = len(ae)
    tau = np.triu(sign(ae) * sign(be), 1).sum() / (me * (me - 1) / 2)
    assert rsa(xe, ye, metric="cosine", compare="kendall", permutations=0).correlation == pytest.approx(tau, rel=1e-12)


def test_rsa_permutation_p_value_matches_explicit_shuffles():
    x, y = _data(10, 4, 25), _data(10, 4, 25) + 2.0 * _data(10, 4, 26)
    result = rsa(x, y, permutations=99, seed=3)
    a, square = rdm(x).numpy(), rdm(y, square=True).numpy()
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(99):
        order = rng.permutation(10)
        shuffled = scipy.spatial.distance.squareform(square[np.ix_(order, order)], checks=False)
        hits += scipy.stats.spearmanr(a, shuffled).statistic >= result.correlation - 1e-12
    assert result.p_value == pytest.approx((1 + hits) / 100)


def test_rsa_p_value_is_small_for_related_and_large_for_unrelated_sets():
    x = _data(30, 8, 27)
    related = rsa(x, x @ _data(8, 8, 28) + 0.3 * _data(30, 8, 29), permutations=500)
    unrelated = rsa(x, _data(30, 8, 30), permutations=500)
    assert related.p_value < 0.01 and related.correlation > 0.3
    assert unrelated.p_value > 0.05
    kendall = rsa(x, x + 0.3 * _data(30, 8, 29), compare="kendall", permutations=100)
    assert kendall.p_value < 0.02


# ------------------------------------------------------------------ CCA family and Procrustes


def test_cca_recovers_a_random_rotation_and_matches_a_hand_computation():
    x = _data(200, 6, 31)
    rotated = x @ _rotation(6, 32) * 2.0 + 1.0
    np.testing.assert_allclose(cca(x, rotated).numpy(), np.ones(6), atol=1e-10)
    y = _data(200, 4, 33) + x[:, :4] * np.array([2.0, 1.0, 0.5, 0.1])
    xc, yc = x - x.mean(0), y - y.mean(0)
    # reference: eigenvalues of Σxx⁻¹ Σxy Σyy⁻¹ Σyx are the squared canonical correlations
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    eig = np.sort(np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)).real)[::-1][:4]
    np.testing.assert_allclose(cca(x, y).numpy(), np.sqrt(eig), rtol=1e-8)


def test_svcca_equals_a_hand_computation():
    x = _data(80, 6, 34) * np.array([5.0, 4.0, 3.0, 0.1, 0.05, 0.01])
    y = x @ _data(6, 5, 35) + _data(80, 5, 36)

    def top(m, k):
        u, s, _ = np.linalg.svd(m - m.mean(0), full_matrices=False)
        return u[:, :k] * s[:k]

    def mean_cca(a, b):
        qa, qb = np.linalg.qr(a - a.mean(0))[0], np.linalg.qr(b - b.mean(0))[0]
        return np.linalg.svd(qa.T @ qb, compute_uv=False).mean()

    assert svcca(x, y, keep=3) == pytest.approx(mean_cca(top(x, 3), top(y, 3)), rel=1e-10)
    def share(m):
        return np.cumsum(np.linalg.svd(m - m.mean(0), compute_uv=False) ** 2) / ((m - m.mean(0)) ** 2).sum()

    kx, ky = int(np.searchsorted(share(x), 0.99) + 1), int(np.searchsorted(share(y), 0.99) + 1)
    assert kx == 3  # the three large directions hold 99% of x's variance
    assert svcca(x, y) == pytest.approx(mean_cca(top(x, kx), top(y, ky)), rel=1e-10)


def test_pwcca_equals_a_hand_computation():
    x = _data(60, 4, 37)
    y = np.hstack([x[:, :2] @ _data(2, 2, 38) + 0.5 * _data(60, 2, 40), _data(60, 3, 39)])  # distinct correlations
    xc, yc = x - x.mean(0), y - y.mean(0)
    qx, qy = np.linalg.qr(xc)[0], np.linalg.qr(yc)[0]
    u, rho, _ = np.linalg.svd(qx.T @ qy)
    h = qx @ u  # canonical variates of x
    alpha = np.abs(h.T @ xc).sum(1)
    expected = (alpha / alpha.sum()) @ rho
    assert pwcca(x, y) == pytest.approx(expected, rel=1e-10)
    assert pwcca(x, x @ _rotation(4, 40)) == pytest.approx(1, abs=1e-10)


def test_procrustes_distance_is_zero_for_a_rotated_copy_and_matches_the_nuclear_norm_form():
    x = _data(50, 5, 41)
    assert procrustes(x, 3.0 * x @ _rotation(5, 42) - 2.0) == pytest.approx(0, abs=1e-10)
    y = _data(50, 3, 43) + x[:, :3]
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    nuclear = np.linalg.svd(xc.T @ yc, compute_uv=False).sum()
    assert procrustes(x, y) == pytest.approx(math.sqrt(2 - 2 * nuclear), rel=1e-10)
    assert procrustes(y, x) == pytest.approx(procrustes(x, y), rel=1e-10)


# ------------------------------------------------------------------ every pair, the view, bad input


def test_similarity_matrix_fills_every_pair_and_renders_bounded_and_escaped():
    sets = {"<b>a</b>": _data(30, 4, 44), "b": _data(30, 6, 45), "c" * 300: _data(30, 3, 46)}
    matrix = similarity_matrix(sets)
    expected = [[cka(a, b) for b in sets.values()] for a in sets.values()]
    np.testing.assert_allclose(matrix.to_numpy(), expected, rtol=1e-12)
    assert matrix.names == list(sets) and matrix.column_names == list(sets)
    assert isinstance(matrix.values, torch.Tensor)
    assert "\n" not in repr(matrix) and repr(matrix).startswith("SimilarityMatrix(cka, 3 × 3")
    page = matrix._repr_html_()
    assert "<b>a</b>" not in page and "&lt;b&gt;a&lt;/b&gt;" in page
    assert "c" * 300 not in page
    figure = matrix.figure()
    np.testing.assert_allclose(figure.data[0].z, expected)
    rows_by_columns = similarity_matrix([_data(30, 4, 44)], list(sets.values()), method="procrustes",
                                        other_names=["x", "y", "z"])
    assert rows_by_columns.to_numpy().shape == (1, 3) and rows_by_columns.column_names == ["x", "y", "z"]
    assert "distance" in rows_by_columns._repr_html_()
    debiased = similarity_matrix(sets, debiased=True).to_numpy()  # each set prepared once, in feature space
    np.testing.assert_allclose(debiased, [[cka(a, b, debiased=True) for b in sets.values()] for a in sets.values()])
    wide = [_data(6, 20, 47), _data(6, 30, 48)]  # more features than rows: pair by pair, Gram matrices
    np.testing.assert_allclose(similarity_matrix(wide).to_numpy()[0, 1], _gram_cka(*(w @ w.T for w in wide)))
    rbf = similarity_matrix(sets, kernel="rbf", sigma=2.0)
    assert rbf.to_numpy()[0, 1] == pytest.approx(cka(sets["b"], sets["<b>a</b>"], kernel="rbf", sigma=2.0))
    assert "kernel=rbf" in repr(rbf)
    big = similarity_matrix([_data(5, 2, i) for i in range(120)], method="cca")
    assert len(big._repr_html_().encode()) < 1_600_000


def test_layer_similarity_of_a_zoo_models_residual_stream():
    model = nm.load("induction-2l")
    trace = model.run(["the cat sat on the mat", "a b c d e f g h"], capture="blocks.*.hook_resid_post")
    matrix = layer_similarity(trace, "blocks.*.hook_resid_post")
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert matrix.names == hooks
    mask = trace.attention_mask.bool()
    a, b = (trace[h][mask].double().numpy() for h in hooks)
    assert matrix.to_numpy()[0, 1] == pytest.approx(_gram_cka(a @ a.T, b @ b.T), rel=1e-8)
    np.testing.assert_allclose(np.diag(matrix.to_numpy()), 1, atol=1e-10)
    assert "blocks.1.hook_resid_post" in matrix._repr_html_()
    pair = cka((trace, hooks[0]), (trace, hooks[1]))
    assert pair == pytest.approx(matrix.to_numpy()[0, 1], rel=1e-12)
    with pytest.raises(nm.HookNameError):
        layer_similarity(trace, "blocks.*.hook_mlp_out")


def test_bad_input_names_the_problem():
    x = _data(10, 3, 47)
    with pytest.raises(nm.InputError, match="10 rows .* and y 9"):
        cka(x, x[:9])
    with pytest.raises(nm.InputError, match="at least 2 rows"):
        cka(x[:1], x[:1])
    with pytest.raises(nm.InputError, match="at least 4 rows"):
        cka(x[:3], x[:3], debiased=True)
    with pytest.raises(nm.InputError, match="NaN or infinite"):
        cka(np.where(x > 1, np.nan, x), x)
    with pytest.raises(nm.InputError, match="'linear', 'rbf'"):
        cka(x, x, kernel="poly")
    with pytest.raises(nm.InputError, match="'correlation', 'cosine', 'euclidean'"):
        rsa(x, x, metric="manhattan")
    with pytest.raises(nm.InputError, match="'spearman', 'kendall'"):
        rsa(x, x, compare="pearson")
    with pytest.raises(nm.InputError, match="'cka', 'rsa', 'cca', 'svcca', 'pwcca', 'procrustes'"):
        similarity_matrix([x, x], method="mmd")
    with pytest.raises(nm.InputError, match="'0' has 10 rows and '1' 9"):
        similarity_matrix([x, x[:9]])
    with pytest.raises(nm.InputError, match="constant"):
        cka(np.ones((10, 3)), x)
    with pytest.raises(nm.InputError, match="keep"):
        svcca(x, x, keep=1.5)
    with pytest.raises(nm.InputError, match="pass kernel='rbf'"):
        cka(x, x, sigma=1.0)
    with pytest.raises(nm.InputError, match="store="):
        minibatch_cka("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    with pytest.raises(nm.InputError, match="at least 3 rows"):
        rdm(x[:2])
    with pytest.raises(nm.InputError, match="undefined"):
        rdm(np.vstack([x[:3], np.zeros((1, 3))]), "cosine")
    with pytest.raises(nm.InputError, match="2 names for 3"):
        similarity_matrix([x, x, x], names=["a", "b"])
    with pytest.raises(nm.InputError, match="batch_size"):
        minibatch_cka(x, x, batch_size=2)


def test_linear_cka_multiplies_in_the_datas_own_precision_with_float64_sums():
    from neuronmap.analysis.activations import product_dtype

    x64, y64 = torch.from_numpy(_data(3000, 40, 50)), torch.from_numpy(_data(3000, 30, 51))
    y64[:, :10] += 3 * x64[:, :10]
    x32, y32 = x64.float(), y64.float()
    exact = cka(x32.double(), y32.double())  # the same float32 numbers in float64 arithmetic
    assert product_dtype(None, [(x32, None), (y32, None)]) == torch.float32
    assert product_dtype(None, [(x32, None), (y64, None)]) == torch.float64
    assert cka(x32, y32, dtype=torch.float64) == exact
    assert cka(x32, y32) != exact and abs(cka(x32, y32) - exact) < 1e-6
    assert abs(cka(x32, y32, debiased=True) - cka(x32.double(), y32.double(), debiased=True)) < 1e-6
    matrix = similarity_matrix([x32, y32]).to_numpy()
    np.testing.assert_allclose(matrix, similarity_matrix([x32, y32], dtype=torch.float64).to_numpy(), atol=1e-6)
    assert matrix[0, 1] == cka(x32, y32)
    with pytest.raises(nm.InputError, match="dtype must be torch.float32, torch.float64 or None"):
        cka(x32, y32, dtype=torch.float16)
