"""Activations projected to a few dimensions: PCA (streaming over an activation store), t-SNE and UMAP, and the
effective dimensionality of a layer (participation ratio, components for 95% / 99% of the variance).

PCA on a store reads it twice, block by block: once to accumulate the mean and the `[features × features]` scatter
matrix in float64 (memory independent of the number of rows), once to project every row on the top components, so
the result equals PCA of the whole matrix in memory. t-SNE (scikit-learn) and UMAP (umap-learn, the `umap` extra) read
the matrix whole. Written here: the streamed covariance (only the panels of `XᵀX` on and above the diagonal) and
projection, and the effective dimensionality; scipy's LAPACK drivers do the eigendecomposition, scikit-learn t-SNE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .activations import as_matrix, product_dtype, token_contexts
from .projection_view import Projection, dimensions_for, participation_ratio
from .streaming import Covariance, features_of, labels_array, row_blocks, store_view

__all__ = ["Projection", "dimensions_for", "effective_dimensionality", "participation_ratio", "pca", "tsne", "umap"]


def pca(source: Any, hook: str | None = None, *, n_components: int = 2, labels: Sequence[Any] | None = None,
        batch_size: int = 4096, dtype: torch.dtype | None = None) -> Projection:
    """Principal components of the rows of `source` (see `as_matrix`), and every row's coordinates on the top
    `n_components`.

    An activation store (with `hook`) or one of its hook views is streamed in blocks of `batch_size` rows, in two
    passes, so memory holds one block and the `[features × features]` covariance whatever the number of rows.
    `labels` (one per row) colour the scatter. The result keeps the whole spectrum (`.explained_variance_ratio` has
    one entry per dimension), so the explained-variance curve and effective dimensionality cover every dimension.
    `dtype`: the precision the rows are multiplied in (`product_dtype`: by default the data's own, float32 for
    float32 activations, about twice as fast as float64 with relative errors near 1e-7; means, sums and results are
    float64 either way).
    """
    _check_int(batch_size, "batch_size", 1)
    dtype = product_dtype(dtype, [(source, hook)])
    view = store_view(source, hook)
    if view is None:
        matrix = as_matrix(source, hook)
        n, d = matrix.shape
        _check_components(n_components, n, d)
        labels = _labels(labels, n)
        mean = matrix.mean(0)
        centred = (matrix - mean).to(dtype)
        if d <= n:
            eigenvalues, top = _spectrum(((centred.T @ centred) / (n - 1)).double(), n_components)
        else:  # fewer rows than features: the thin SVD of the rows is smaller than the covariance
            _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
            eigenvalues, top = singular.double() ** 2 / (n - 1), vt[:n_components].double()
        components = _flipped(top)
        coordinates = (centred @ components.to(dtype).T).double()
    else:
        n, d = len(view), features_of(view)
        _check_components(n_components, n, d)
        labels = _labels(labels, n)
        covariance = _streamed_covariance(view, batch_size, dtype)
        mean = covariance.mean
        eigenvalues, top = _spectrum(covariance.covariance, n_components)
        components = _flipped(top)
        shift, axes = mean.to(dtype), components.to(dtype).T
        blocks = row_blocks(view, None, batch_size, dtype=dtype, reuse=True)
        coordinates = torch.cat([block.sub_(shift) @ axes for block in blocks]).double()
    return Projection(
        coordinates, "PCA", labels=labels, hover=token_contexts(source, hook), components=components, mean=mean,
        eigenvalues=eigenvalues.clamp(min=0)[: min(n, d)],
    )


def effective_dimensionality(source: Any, hook: str | None = None, *, batch_size: int = 4096,
                             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """How many dimensions the rows of `source` really use: the participation ratio `(Σλ)² / Σλ²` of the
    covariance eigenvalues λ, and the number of principal components that explain 95% and 99% of the variance. A
    store is streamed (one pass); `dtype` as for `pca`."""
    _check_int(batch_size, "batch_size", 1)
    dtype = product_dtype(dtype, [(source, hook)])
    view = store_view(source, hook)
    if view is None:
        matrix = as_matrix(source, hook)
        if len(matrix) < 2:
            raise InputError(f"effective dimensionality needs at least 2 rows (samples), got {len(matrix)}")
        centred = (matrix - matrix.mean(0)).to(dtype)
        if matrix.shape[1] <= len(matrix):
            eigenvalues = _spectrum((centred.T @ centred / (len(matrix) - 1)).double(), 0)[0]
        else:
            eigenvalues = torch.linalg.svdvals(centred).double() ** 2 / (len(matrix) - 1)
        rows, features = matrix.shape
    else:
        if len(view) < 2:
            raise InputError(f"effective dimensionality needs at least 2 rows (samples), got {len(view)}")
        eigenvalues = _spectrum(_streamed_covariance(view, batch_size, dtype).covariance, 0)[0]
        rows, features = len(view), features_of(view)
    spectrum = eigenvalues.clamp(min=0)
    return {"participation_ratio": participation_ratio(spectrum), "dims_95": dimensions_for(spectrum, 0.95),
            "dims_99": dimensions_for(spectrum, 0.99), "rows": rows, "features": features}


def tsne(source: Any, hook: str | None = None, *, n_components: int = 2, perplexity: float = 30.0,
         labels: Sequence[Any] | None = None, seed: int = 0, pca_components: int | None = 50) -> Projection:
    """t-SNE embedding (scikit-learn's `TSNE`, PCA initialisation, automatic learning rate) of the rows of `source`.

    Rows with more than `pca_components` features are first reduced to that many principal components (`pca`), as is
    usual, which removes noise and makes the neighbour search fast; `None` keeps every feature. The perplexity must
    be below the number of rows."""
    from sklearn.manifold import TSNE

    matrix = as_matrix(source, hook)
    n = len(matrix)
    _check_int(n_components, "n_components", 1)
    if n_components > 3:
        raise InputError(f"t-SNE embeds in 1 to 3 dimensions (Barnes-Hut), got n_components={n_components}")
    if not perplexity > 0 or n <= perplexity:
        raise InputError(
            f"t-SNE needs more rows (samples) than its perplexity: {n} rows for perplexity={perplexity}; "
            f"lower the perplexity (below {n}) or give more rows"
        )
    labels = _labels(labels, n)
    if pca_components is not None and matrix.shape[1] > pca_components:
        matrix = pca(matrix, n_components=min(pca_components, n)).coordinates
    embedding = TSNE(n_components=n_components, perplexity=perplexity, random_state=seed, init="pca",
                     learning_rate="auto").fit_transform(matrix.numpy())
    return Projection(torch.from_numpy(embedding).double(), "t-SNE", labels=labels, hover=token_contexts(source, hook))


def umap(source: Any, hook: str | None = None, *, n_components: int = 2, n_neighbors: int = 15,
         min_dist: float = 0.1, labels: Sequence[Any] | None = None, seed: int = 0) -> Projection:
    """UMAP embedding (umap-learn, installed with `pip install "neuronmap[umap]"`) of the rows of `source`."""
    try:
        import umap as umap_learn
    except ImportError as error:
        raise InputError('UMAP needs umap-learn, which is not installed: pip install "neuronmap[umap]"') from error
    matrix = as_matrix(source, hook)
    n = len(matrix)
    _check_int(n_components, "n_components", 1)
    if n <= max(n_neighbors, n_components + 1):
        raise InputError(f"UMAP needs more rows (samples) than n_neighbors={n_neighbors}, got {n}")
    labels = _labels(labels, n)
    reducer = umap_learn.UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed)
    embedding = reducer.fit_transform(matrix.numpy())
    return Projection(torch.from_numpy(np.asarray(embedding)).double(), "UMAP", labels=labels,
                      hover=token_contexts(source, hook))


def _streamed_covariance(view: Any, batch_size: int, dtype: torch.dtype) -> Covariance:
    """The mean and covariance of every row of a store's hook view, its blocks multiplied in `dtype`."""
    covariance = Covariance(features_of(view))
    for block in row_blocks(view, None, batch_size, dtype=dtype, reuse=True):
        covariance.add(block, overwrite=True)
    return covariance


def _spectrum(covariance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every eigenvalue (descending) of a symmetric matrix and the eigenvectors of the top `k` (rows, same order).
    scipy's LAPACK drivers, asked for the values alone and for only `k` vectors, are several times faster here
    than a full `torch.linalg.eigh`."""
    from scipy.linalg import eigh

    matrix = covariance.numpy()
    values = torch.from_numpy(eigh(matrix, eigvals_only=True)).flip(0)
    if k == 0:
        return values, covariance.new_empty(0, len(matrix))
    d = len(matrix)
    _, vectors = eigh(matrix, subset_by_index=[d - k, d - 1])
    return values, torch.from_numpy(vectors[:, ::-1].T.copy())


def _flipped(components: torch.Tensor) -> torch.Tensor:
    """Components signed so that each one's largest-magnitude entry is positive (scikit-learn's convention), so the
    same data gives the same signs."""
    largest = components.abs().argmax(1)
    signs = torch.sign(components[torch.arange(len(components)), largest])
    return components * torch.where(signs == 0, 1.0, signs).to(components.dtype)[:, None]


def _check_components(n_components: int, n: int, d: int) -> None:
    _check_int(n_components, "n_components", 1)
    if n < 2:
        raise InputError(f"PCA needs at least 2 rows (samples), got {n}")
    if n_components > min(n, d):
        raise InputError(f"n_components={n_components} is more than min(rows, features) = min({n}, {d})")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an int of at least {minimum}, got {value!r}")


def _labels(labels: Sequence[Any] | None, n: int) -> np.ndarray | None:
    return None if labels is None else labels_array(labels, n)
