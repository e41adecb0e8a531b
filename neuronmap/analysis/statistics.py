"""What each neuron and each layer does over a dataset: per-neuron moments and sparsity, per-layer norms, effective
rank and outlier dimensions, and how well one layer's neurons are matched by another's (cross-layer correlation).

Per-neuron statistics and layer summaries stream an activation store block by block in float64, merging each block's
centred moments exactly (Chan et al. 1979, Pébay 2008), so no more than a block is held; a `Trace` or tensor is one
block. numpy/scipy have no streamed moments of order 3-4 nor a merged covariance, so those are written here; scipy's
`skew`/`kurtosis` are what the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InputError
from ..trace import Trace
from .activations import as_matrix
from .similarity import _matching
from .similarity_view import SimilarityMatrix
from .statistics_view import LayerSummary, NeuronStatistics
from .streaming import Covariance, features_of, row_blocks, source_name, store_view

OUTLIER_FACTOR = 6.0
"""Default outlier rule of `layer_summary`: a feature whose mean |activation| is more than this many times the
median feature's mean |activation|."""


def neuron_statistics(
    source: Any, hook: str | None = None, *, zero_threshold: float = 0.0, batch_size: int = 4096
) -> NeuronStatistics:
    """Per neuron (feature): mean, std, sparsity, skewness, excess kurtosis, min and max over every row.

    `source`: a `Trace` with `hook`, a tensor or array `[..., features]`, or an activation store with `hook` (or a
    store's hook view `store[hook]`), which is streamed `batch_size` rows at a time, never read whole. `std` is the
    population standard deviation and skewness / kurtosis the moment estimators (`ddof=0`; scipy.stats' `skew` and
    `kurtosis` with `bias=True`), NaN for a constant neuron; sparsity is the fraction of rows with
    `|x| <= zero_threshold`. Every value is accumulated in float64 with blocks merged exactly (Pébay 2008).
    """
    if not zero_threshold >= 0:
        raise InputError(f"zero_threshold must be >= 0, got {zero_threshold!r}")
    moments = None
    for block in row_blocks(source, hook, batch_size):
        moments = _Moments.of(block, zero_threshold).merged(moments)
    if moments is None:
        raise InputError("no rows to summarise: the activations are empty")
    return moments.statistics(source_name(source, hook), zero_threshold)


def layer_summary(
    source: Any,
    hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
    *,
    outlier_factor: float = OUTLIER_FACTOR,
    batch_size: int = 4096,
) -> LayerSummary:
    """For each hook point of a `Trace` or activation store matching `hooks` (names or glob patterns), or each entry
    of a `{name: activations}` mapping: the mean and std of the rows' L2 norms, the effective rank, and the outlier
    dimensions.

    Effective rank (Roy & Vetterli 2007): `exp(-Σ pᵢ log pᵢ)` with `pᵢ = σᵢ / Σσ` the normalised singular values of
    the column-centred matrix; between 1 (one direction) and the number of features. Outlier dimensions: features
    whose mean |activation| exceeds `outlier_factor` times the median over features of the mean |activation|.
    A store is streamed (the norms, mean |x| and the `[features × features]` centred co-moment matrix, merged per
    block; its eigenvalues are the squared singular values); a trace's matrix is decomposed directly.
    """
    if not outlier_factor > 0:
        raise InputError(f"outlier_factor must be positive, got {outlier_factor!r}")
    sets = _hook_sets(source, hooks, "layer_summary", minimum=1)
    rows = [_layer_row(name, matrix, outlier_factor, batch_size) for name, matrix in sets]
    return LayerSummary(rows, outlier_factor)


def cross_layer_correlation(
    source: Any, hooks: str | Sequence[str] = "blocks.*.hook_resid_post"
) -> SimilarityMatrix:
    """How well each layer's neurons are matched by single neurons of another layer (Li et al. 2016, "convergent
    learning"): entry `[i, j]` is the mean over layer i's neurons of the largest |Pearson correlation| with any
    neuron of layer j. Asymmetric; 1 on the diagonal.

    `source`: a `Trace` or activation store with `hooks` (names or glob patterns), or a `{name: activations}`
    mapping of sets over the same inputs; each set is read whole (`as_matrix`). Constant neurons have no correlation:
    they are left out of the mean and match nothing.
    """
    sets = [(name, as_matrix(*matrix) if isinstance(matrix, tuple) else as_matrix(matrix))
            for name, matrix in _hook_sets(source, hooks, "cross_layer_correlation", minimum=2)]
    first_name, first = sets[0]
    for name, matrix in sets:
        if len(matrix) != len(first):
            raise InputError(f"{first_name!r} has {len(first):,} rows and {name!r} {len(matrix):,}: "
                             "correlate activations of the same inputs")
    if len(first) < 2:
        raise InputError(f"correlation needs at least 2 rows (samples), got {len(first)}")
    standard = [_standardised(matrix) for _, matrix in sets]
    values = torch.empty((len(sets), len(sets)), dtype=torch.float64)
    for i, (a, live) in enumerate(standard):
        if not live.any():
            raise InputError(f"every neuron of {sets[i][0]!r} is constant: no correlation to report")
        for j, (b, _) in enumerate(standard):
            best = (a.T @ b / len(a)).abs().clamp(max=1).amax(1)
            values[i, j] = best[live].mean()
    names = [name for name, _ in sets]
    return SimilarityMatrix(values, names, names, "max |correlation|, mean over the row layer's neurons")


def neuron_correlation(x: Any, y: Any = None) -> torch.Tensor:
    """The `[features of x, features of y]` Pearson correlation of every neuron of `x` with every neuron of `y`
    (of `x` with itself without `y`), both sets over the same rows; NaN for a constant neuron, as `numpy.corrcoef`."""
    a = as_matrix(*x) if isinstance(x, tuple) else as_matrix(x)
    b = a if y is None else as_matrix(*y) if isinstance(y, tuple) else as_matrix(y)
    if len(a) != len(b):
        raise InputError(f"x has {len(a):,} rows (samples) and y {len(b):,}: correlate activations of the same inputs")
    if len(a) < 2:
        raise InputError(f"correlation needs at least 2 rows (samples), got {len(a)}")
    (za, live_a), (zb, live_b) = _standardised(a), _standardised(b)
    values = (za.T @ zb / len(a)).clamp(-1, 1)
    values[~live_a] = float("nan")
    values[:, ~live_b] = float("nan")
    return values


class _Moments:
    """Count, mean, centred sums of powers 2-4, min, max and zero count per feature of a set of rows, mergeable."""

    def __init__(self, n: int, mean: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor, m4: torch.Tensor,
                 low: torch.Tensor, high: torch.Tensor, zeros: torch.Tensor):
        self.n, self.mean, self.m2, self.m3, self.m4 = n, mean, m2, m3, m4
        self.low, self.high, self.zeros = low, high, zeros

    @classmethod
    def of(cls, block: torch.Tensor, zero_threshold: float) -> _Moments:
        mean = block.mean(0)
        centred = block - mean
        squared = centred.square()
        return cls(len(block), mean, squared.sum(0), (squared * centred).sum(0), squared.square().sum(0),
                   block.amin(0), block.amax(0), (block.abs() <= zero_threshold).sum(0).to(torch.float64))

    def merged(self, other: _Moments | None) -> _Moments:
        """`self` and `other` as one set (Pébay 2008, eqs. 2.1-2.4, pairwise form)."""
        if other is None:
            return self
        a, b = other, self
        n = a.n + b.n
        delta = b.mean - a.mean
        ab = a.n * b.n
        m2 = a.m2 + b.m2 + delta.square() * ab / n
        m3 = (a.m3 + b.m3 + delta.pow(3) * ab * (a.n - b.n) / n**2
              + 3 * delta * (a.n * b.m2 - b.n * a.m2) / n)
        m4 = (a.m4 + b.m4 + delta.pow(4) * ab * (a.n**2 - ab + b.n**2) / n**3
              + 6 * delta.square() * (a.n**2 * b.m2 + b.n**2 * a.m2) / n**2
              + 4 * delta * (a.n * b.m3 - b.n * a.m3) / n)
        return _Moments(n, a.mean + delta * b.n / n, m2, m3, m4, torch.minimum(a.low, b.low),
                        torch.maximum(a.high, b.high), a.zeros + b.zeros)

    def statistics(self, name: str, zero_threshold: float) -> NeuronStatistics:
        variance = self.m2 / self.n
        # scipy's test for a constant input: a variance indistinguishable from round-off of the mean
        constant = variance <= (1e-14 * self.mean).square()
        skewness = (self.m3 / self.n) / variance.pow(1.5)
        kurtosis = (self.m4 / self.n) / variance.square() - 3
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return NeuronStatistics(
            name=name, rows=self.n, zero_threshold=zero_threshold, mean=self.mean, std=variance.sqrt(),
            sparsity=self.zeros / self.n, skewness=torch.where(constant, nan, skewness),
            kurtosis=torch.where(constant, nan, kurtosis), min=self.low, max=self.high,
        )


# ---------------------------------------------------------------- layers


def _layer_row(name: str, source: Any, outlier_factor: float, batch_size: int) -> dict[str, Any]:
    """One layer's summary: rows, features, norm mean and std, effective rank, outlier features."""
    matrix_source, hook = source if isinstance(source, tuple) else (source, None)
    view = store_view(matrix_source, hook)
    covariance = Covariance(features_of(view)) if view is not None else None
    norms = abs_sum = singular = None
    for block in row_blocks(matrix_source, hook, batch_size, reuse=True):
        norms = _Moments.of(block.norm(dim=1)[:, None], 0.0).merged(norms)
        abs_sum = block.abs().sum(0) if abs_sum is None else abs_sum + block.abs().sum(0)
        if covariance is None:  # the one block of a matrix in memory
            singular = torch.linalg.svdvals(block - block.mean(0))
        else:
            covariance.add(block, overwrite=True)  # the block's last use
    if norms is None:
        raise InputError(f"{name!r} has no rows to summarise")
    if covariance is not None:
        singular = _singular_values(covariance.comoment)
    mean_abs = abs_sum / norms.n
    median = float(mean_abs.quantile(0.5))
    outliers = torch.nonzero(mean_abs > outlier_factor * median).flatten() if median > 0 else torch.zeros(0, dtype=torch.long)
    outliers = outliers[torch.argsort(mean_abs[outliers], descending=True)]
    return {"name": name, "rows": norms.n, "features": len(mean_abs), "norm_mean": float(norms.mean[0]),
            "norm_std": math.sqrt(float(norms.m2[0]) / norms.n), "effective_rank": effective_rank(singular),
            "outliers": outliers.tolist(), "outlier_ratios": (mean_abs[outliers] / median).tolist()}


def _singular_values(comoment: torch.Tensor) -> torch.Tensor:
    """A centred matrix's singular values from its co-moment `Σ (x - mean)(x - mean)ᵀ`: square roots of the
    eigenvalues, those within round-off (below `λ_max · features · eps`) taken as 0."""
    eigen = torch.linalg.eigvalsh(comoment)
    return torch.where(eigen > eigen[-1] * len(eigen) * torch.finfo(eigen.dtype).eps, eigen, 0).sqrt()


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's (2007) effective rank of a matrix with these singular values: `exp` of the Shannon entropy
    (nats) of the singular values normalised to sum 1; 0 for a zero matrix."""
    total = float(singular_values.sum())
    if total == 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _hook_sets(source: Any, hooks: str | Sequence[str], what: str, minimum: int) -> list[tuple[str, Any]]:
    """`(name, source)` pairs to read: a mapping's entries, or the matching hooks of a trace (`(trace, hook)`) or
    store (its hook views)."""
    if isinstance(source, Mapping):
        sets = [(str(name), value) for name, value in source.items()]
    elif isinstance(source, Trace) or (hasattr(source, "hooks") and hasattr(source, "batches")):
        available = list(source.keys()) if isinstance(source, Trace) else list(source.hooks)
        chosen = _matching(available, [hooks] if isinstance(hooks, str) else list(hooks))
        sets = [(hook, (source, hook) if isinstance(source, Trace) else source[hook]) for hook in chosen]
    else:
        raise InputError(f"{what} reads a Trace or activation store (with hooks=) or a {{name: activations}} mapping, "
                         f"not a {type(source).__name__}")
    if len(sets) < minimum:
        raise InputError(f"{what} needs at least {minimum} activation sets, got {len(sets)}")
    return sets


def _standardised(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns centred and scaled to unit population std (constant columns left at 0), and which are not constant."""
    centred = matrix - matrix.mean(0)
    std = centred.square().mean(0).sqrt()
    live = std > 1e-14 * matrix.abs().amax(0).clamp(min=1e-300)
    return centred / torch.where(live, std, torch.ones_like(std)) * live, live
