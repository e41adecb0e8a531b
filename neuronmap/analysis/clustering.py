"""Clusters of activation rows: k-means (k chosen by silhouette when not given), DBSCAN and agglomerative
clustering with its dendrogram, scored by silhouette and Calinski–Harabasz, each cluster listed with its most
frequent tokens and the rows nearest its centre in context.

scikit-learn does k-means, DBSCAN and the scores; scipy the hierarchical linkage. Written here: choosing k, the
per-cluster token listings, and (in the view) the truncated dendrogram.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..trace import Trace
from .activations import as_matrix, row_tokens, token_contexts
from .cluster_view import ClusterSummary, Clusters
from .projections import pca

__all__ = ["Clusters", "agglomerative", "dbscan", "kmeans"]

SILHOUETTE_ROWS = 5000
"""Silhouettes (which compare every pair of rows) are computed on a seeded sample of this many rows when there are
more; the Calinski–Harabasz score always uses every row."""
MAX_AGGLOMERATIVE_ROWS = 20_000
"""Agglomerative clustering keeps every pairwise distance (n²/2 of them): more rows than this is an error."""
LINKAGES = ("ward", "complete", "average", "single")
TOP_TOKENS = 5
EXAMPLES = 3


def kmeans(source: Any, hook: str | None = None, *, k: int | None = None, k_range: Sequence[int] = range(2, 11),
           seed: int = 0, n_init: int = 10) -> Clusters:
    """k-means (scikit-learn, k-means++ started `n_init` times, the best kept) of the rows of `source`.

    With `k=None`, every k of `k_range` (below the number of rows) is fitted and the one with the highest silhouette
    is kept (the smallest such k on a tie); `.silhouette_by_k` keeps the whole curve. `seed` fixes the starts and
    the silhouette's row sample.
    """
    from sklearn.cluster import KMeans

    x = _matrix(source, hook)
    _check_int(n_init, "n_init", 1)

    def fit(clusters: int) -> np.ndarray:
        return KMeans(n_clusters=clusters, n_init=n_init, random_state=seed).fit_predict(x)

    if k is not None:
        _check_k(k, len(x))
        return _result(source, hook, x, fit(k), "k-means", seed)
    candidates = [int(c) for c in k_range if 2 <= c < len(x)]
    if not candidates:
        raise InputError(f"no k in k_range={list(k_range)} is between 2 and the {len(x)} rows - 1: choosing k by "
                         "silhouette needs at least 2 clusters and more rows than clusters")
    fits = {c: fit(c) for c in candidates}
    curve = {c: _silhouette(x, labels, seed) for c, labels in fits.items()}
    best = max(candidates, key=lambda c: (np.nan_to_num(curve[c], nan=-2.0), -c))
    return _result(source, hook, x, fits[best], "k-means", seed, silhouette_by_k=curve)


def dbscan(source: Any, hook: str | None = None, *, eps: float, min_samples: int = 5, seed: int = 0) -> Clusters:
    """DBSCAN (scikit-learn, Euclidean) of the rows of `source`: clusters of rows with at least `min_samples`
    neighbours within `eps`; rows in none are noise (label -1). The scores leave the noise out; `seed` fixes the
    silhouette's row sample when there are more than `SILHOUETTE_ROWS` rows."""
    from sklearn.cluster import DBSCAN

    x = _matrix(source, hook)
    if not eps > 0:
        raise InputError(f"eps must be a positive distance, got {eps!r}")
    _check_int(min_samples, "min_samples", 1)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(x)
    return _result(source, hook, x, labels, "DBSCAN", seed)


def agglomerative(source: Any, hook: str | None = None, *, k: int, linkage: str = "ward", seed: int = 0) -> Clusters:
    """Hierarchical clustering (scipy's `linkage`, Euclidean) of the rows of `source`, cut into at most `k` clusters
    (`fcluster(..., criterion="maxclust")`); `.linkage` keeps the merge tree the dendrogram draws. `seed` fixes the
    silhouette's row sample when there are more than `SILHOUETTE_ROWS` rows."""
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as merge_tree

    if linkage not in LINKAGES:
        raise InputError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    x = _matrix(source, hook)
    _check_k(k, len(x))
    if len(x) > MAX_AGGLOMERATIVE_ROWS:
        raise InputError(f"agglomerative clustering keeps all n²/2 distances: {len(x):,} rows is more than "
                         f"{MAX_AGGLOMERATIVE_ROWS:,}; cluster a sample of rows, or use kmeans")
    tree = merge_tree(x, method=linkage, metric="euclidean")
    labels = fcluster(tree, t=k, criterion="maxclust") - 1
    return _result(source, hook, x, labels, f"agglomerative ({linkage})", seed, linkage=tree)


def _result(source: Any, hook: str | None, x: np.ndarray, labels: np.ndarray, method: str, seed: int,
            **extra: Any) -> Clusters:
    """The clusters with their scores, token listings and the rows' 2D principal-component coordinates."""
    from sklearn.metrics import calinski_harabasz_score

    labels = np.asarray(labels, dtype=np.int64)
    clustered = labels >= 0
    kinds = len(np.unique(labels[clustered]))
    scored = 2 <= kinds < int(clustered.sum())
    silhouette = _silhouette(x[clustered], labels[clustered], seed) if scored else float("nan")
    harabasz = float(calinski_harabasz_score(x[clustered], labels[clustered])) if scored else float("nan")
    contexts = token_contexts(source, hook)
    coordinates = pca(x, n_components=min(2, x.shape[1])).coordinates
    return Clusters(labels, method, silhouette=silhouette, calinski_harabasz=harabasz, coordinates=coordinates,
                    summaries=_summaries(x, labels, _row_strings(source, hook), contexts), hover=contexts, **extra)


def _summaries(x: np.ndarray, labels: np.ndarray, tokens: list[str] | None,
               contexts: Sequence[str] | None) -> list[ClusterSummary]:
    """Each cluster's size, most frequent tokens (with counts) and the rows nearest its centre (in context)."""
    out = []
    for cluster in sorted(np.unique(labels), key=lambda c: (c < 0, c)):  # noise (-1) last
        rows = np.flatnonzero(labels == cluster)
        top = Counter(tokens[r] for r in rows).most_common(TOP_TOKENS) if tokens is not None else []
        distance = ((x[rows] - x[rows].mean(0)) ** 2).sum(1)
        nearest = rows[np.argsort(distance, kind="stable")[:EXAMPLES]]
        examples = [contexts[r] for r in nearest] if contexts is not None else [f"row {r}" for r in nearest]
        out.append(ClusterSummary(int(cluster), len(rows), top, examples))
    return out


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Mean silhouette (scikit-learn), on a seeded sample of `SILHOUETTE_ROWS` rows when there are more; NaN when
    the labels do not make 2 to n - 1 clusters."""
    from sklearn.metrics import silhouette_score

    if not 2 <= len(np.unique(labels)) < len(labels):
        return float("nan")
    sample = SILHOUETTE_ROWS if len(labels) > SILHOUETTE_ROWS else None
    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def _row_strings(source: Any, hook: str | None) -> list[str] | None:
    """Each row's token as a string, or None when the source does not say which token a row is."""
    ids = row_tokens(source, hook)
    if ids is None:
        return None
    if isinstance(source, Trace):
        return [token for tokens in source.str_tokens for token in tokens]
    vocabulary = source.vocabulary
    return [vocabulary[int(i)] for i in ids]


def _matrix(source: Any, hook: str | None) -> np.ndarray:
    x = as_matrix(source, hook).numpy()
    if len(x) < 2:
        raise InputError(f"clustering needs at least 2 rows (samples), got {len(x)}")
    return x


def _check_k(k: Any, n: int) -> None:
    _check_int(k, "k", 1)
    if k > n:
        raise InputError(f"k={k} clusters is more than the {n} rows (samples)")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an int of at least {minimum}, got {value!r}")
