"""Clustering: k-means (planted clusters recovered, k chosen by silhouette), DBSCAN against scikit-learn,
agglomerative against scipy's fcluster, the scores against sklearn.metrics, token listings from a trace, the views,
and bad input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import neuronmap as nm
from neuronmap.analysis import clustering
from neuronmap.analysis.activations import token_contexts
from neuronmap.analysis.clustering import agglomerative, dbscan, kmeans


def _planted(k: int = 4, per: int = 40, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`k` tight, well-separated blobs of `per` rows each, and their true labels."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(k), per)
    return rng.normal(size=(k, d))[truth] * 20 + rng.normal(size=(k * per, d)), truth


def test_kmeans_recovers_planted_clusters_and_chooses_their_number_by_silhouette():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    x, truth = _planted(k=4)
    found = kmeans(x, k_range=range(2, 8), seed=3)
    assert found.k == 4 and adjusted_rand_score(truth, found.labels) == 1.0
    by_hand = {k: silhouette_score(x, KMeans(n_clusters=k, n_init=10, random_state=3).fit_predict(x))
               for k in range(2, 8)}
    assert found.silhouette_by_k.keys() == by_hand.keys()
    for k, score in by_hand.items():
        assert found.silhouette_by_k[k] == pytest.approx(score, abs=1e-12)
    assert max(by_hand, key=by_hand.get) == 4
    given = kmeans(x, k=4, seed=3)
    assert adjusted_rand_score(truth, given.labels) == 1.0 and given.silhouette_by_k is None


def test_scores_equal_sklearn_metrics():
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    x, _ = _planted(k=3, per=30, seed=1)
    x = x + np.random.default_rng(2).normal(size=x.shape) * 15  # overlapping, so the scores are not trivial
    found = kmeans(x, k=3)
    assert found.silhouette == pytest.approx(silhouette_score(x, found.labels), abs=1e-12)
    assert found.calinski_harabasz == pytest.approx(calinski_harabasz_score(x, found.labels), rel=1e-12)


def test_many_rows_score_silhouette_on_a_seeded_sample(monkeypatch):
    from sklearn.metrics import silhouette_score

    x, _ = _planted(k=3, per=30, seed=4)
    monkeypatch.setattr(clustering, "SILHOUETTE_ROWS", 50)
    found = kmeans(x, k=3, seed=7)
    assert found.silhouette == pytest.approx(silhouette_score(x, found.labels, sample_size=50, random_state=7),
                                             abs=1e-12)


def test_agglomerative_labels_equal_scipy_fcluster_on_the_same_linkage():
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.metrics import adjusted_rand_score

    x, truth = _planted(k=3, per=20, seed=5)
    x = x + np.random.default_rng(6).normal(size=x.shape) * 8
    for method in ("ward", "average", "complete", "single"):
        found = agglomerative(x, k=3, linkage=method)
        tree = linkage(x, method=method)
        np.testing.assert_array_equal(found.linkage, tree)
        np.testing.assert_array_equal(found.labels, fcluster(tree, t=3, criterion="maxclust") - 1)
    clean, truth = _planted(k=3, per=20, seed=5)
    assert adjusted_rand_score(truth, agglomerative(clean, k=3).labels) == 1.0


def test_dbscan_equals_sklearn_and_scores_leave_noise_out():
    from sklearn.cluster import DBSCAN
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    x, _ = _planted(k=3, per=30, d=2, seed=8)
    x = np.vstack([x, np.random.default_rng(9).uniform(-60, 60, size=(15, 2))])  # scattered noise
    found = dbscan(x, eps=2.0, min_samples=4)
    expected = DBSCAN(eps=2.0, min_samples=4).fit_predict(x)
    np.testing.assert_array_equal(found.labels, expected)
    kept = expected >= 0
    assert (~kept).sum() > 0 and found.k == len(set(expected[kept]))
    assert found.silhouette == pytest.approx(silhouette_score(x[kept], expected[kept]), abs=1e-12)
    assert found.calinski_harabasz == pytest.approx(calinski_harabasz_score(x[kept], expected[kept]), rel=1e-12)
    np.testing.assert_array_equal(found.members(-1), np.flatnonzero(~kept))
    assert found.summaries[-1].cluster == -1 and "noise" in repr(found)


def test_clusters_of_a_trace_list_their_tokens_and_nearest_rows_in_context():
    model = nm.load("induction-2l")
    hook = "blocks.0.hook_resid_post"
    trace = model.run(["the cat sat on the mat and the cat sat", "a dog ran to the park"], capture=hook)
    found = kmeans(trace, hook, k=3)
    tokens = [t for row in trace.str_tokens for t in row]
    contexts = token_contexts(trace, hook)
    assert len(found.labels) == len(tokens) and found.hover == contexts
    for summary in found.summaries:
        rows = found.members(summary.cluster)
        assert summary.size == len(rows)
        assert summary.top_tokens == Counter(tokens[r] for r in rows).most_common(5)
        x = nm.analysis.as_matrix(trace, hook).numpy()[rows]
        nearest = rows[np.argsort(((x - x.mean(0)) ** 2).sum(1), kind="stable")[:3]]
        assert summary.examples == [contexts[r] for r in nearest]
    page = found._repr_html_()
    assert "most frequent tokens" in page and "<circle" in page


def test_views_render_the_table_scatter_curve_and_dendrogram():
    x, _ = _planted(k=3, per=25, seed=10)
    chosen = kmeans(x, k_range=range(2, 6))
    page = chosen._repr_html_()
    assert "silhouette by k (chosen: k=3)" in page and page.count("<circle") >= len(x)
    assert chosen.silhouette_figure().data[0].y == tuple(chosen.silhouette_by_k[k] for k in range(2, 6))
    tree = agglomerative(x, k=3)
    page = tree._repr_html_()
    assert "dendrogram: the last 29 merges" in page and "cut into 3 clusters" in page
    figure = tree.figure()
    assert len([t for t in figure.data if t.mode == "markers"]) == 3  # one trace per cluster
    assert len([t for t in figure.data if t.mode == "lines"]) == 29  # one per merge drawn
    np.testing.assert_array_equal(tree.to_numpy(), tree.labels)
    assert repr(tree).startswith("Clusters(agglomerative (ward), k=3, 75 rows")


def test_bad_input_is_named(monkeypatch):
    x, _ = _planted(k=2, per=3)
    with pytest.raises(nm.InputError, match="k=7 clusters is more than the 6 rows"):
        kmeans(x, k=7)
    with pytest.raises(nm.InputError, match="no k in k_range"):
        kmeans(x, k_range=range(6, 9))
    with pytest.raises(nm.InputError, match="k=9 clusters"):
        agglomerative(x, k=9)
    with pytest.raises(nm.InputError, match="linkage must be one of"):
        agglomerative(x, k=2, linkage="median")
    with pytest.raises(nm.InputError, match="eps must be a positive"):
        dbscan(x, eps=0)
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(nm.InputError, match="1 NaN or infinite"):
        kmeans(bad, k=2)
    with pytest.raises(nm.InputError, match="at least 2 rows"):
        dbscan(x[:1], eps=1.0)
    monkeypatch.setattr(clustering, "MAX_AGGLOMERATIVE_ROWS", 5)
    with pytest.raises(nm.InputError, match="6 rows is more than 5"):
        agglomerative(x, k=2)
    with pytest.raises(nm.InputError, match="no cluster 5"):
        kmeans(x, k=2).members(5)
