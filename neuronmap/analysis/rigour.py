"""Rigour for the numbers analyses report: bootstrap confidence intervals for any scalar measured on rows, and
multiple-comparison correction of p-values when many neurons or layers are tested at once.

`bootstrap` resamples rows (inputs or tokens) with replacement and recomputes the measure, so every scalar reported
by this package (a CKA, an RSA correlation, a probe accuracy, a neuron's mean or mutual information, an effective
rank) gets an interval the same way. scipy has a bootstrap but not one that resamples the rows of several torch
tensors jointly for an arbitrary measure, and neither numpy nor scipy has Bonferroni or Holm correction, so these
are written here (scipy's `false_discovery_control` is the tests' reference for Benjamini–Hochberg).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..display import Renders, escape
from ..errors import InputError
from ..histogram import histogram_svg
from .activations import as_matrix

INTERVALS = ("percentile", "bca")
CORRECTIONS = ("bonferroni", "holm", "bh")


class Estimate(Renders):
    """A measured value with its bootstrap confidence interval: `.value` (the measure on all rows), `.low`, `.high`
    (the `.confidence` interval from `.n_resamples` resamples by `.interval`), and `.distribution`, the resampled
    values. Prints as `0.83 [0.80, 0.86] 95% CI`; `float(estimate)` is the value."""

    def __init__(self, value: float, low: float, high: float, confidence: float, n_resamples: int, *,
                 interval: str = "percentile", distribution: torch.Tensor | None = None):
        self.value, self.low, self.high = float(value), float(low), float(high)
        self.confidence, self.n_resamples, self.interval = confidence, n_resamples, interval
        self.distribution = distribution

    def __float__(self) -> float:
        return self.value

    def to_numpy(self) -> np.ndarray:
        """`[value, low, high]` as a float64 array."""
        return np.array([self.value, self.low, self.high])

    def __str__(self) -> str:
        digits = _decimals(self.high - self.low, self.value)
        return (f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"{self.confidence * 100:g}% CI")

    def __repr__(self) -> str:
        return f"Estimate({self}, {self.interval} bootstrap of {self.n_resamples:,} resamples)"

    def _repr_html_(self) -> str:
        head = f'<div class="nm-estimate"><div style="font-weight:600">{escape(str(self))}</div>'
        note = f"{self.interval} interval from {self.n_resamples:,} row resamples"
        if self.distribution is None or len(self.distribution) == 0:
            return f"{head}<div>{escape(note)}</div></div>"
        values = self.distribution
        low, high = float(values.min()), float(values.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
        counts = torch.histc(values, bins=30, min=low, max=high).tolist()
        edges = torch.linspace(low, high, 31).tolist()
        return head + histogram_svg(counts, edges, title="bootstrap distribution", x_label="resampled value",
                                    note=note) + "</div>"


def bootstrap(
    measure: Callable[..., Any],
    *sets: Any,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    interval: str = "percentile",
) -> Estimate:
    """`measure(*sets)` with a bootstrap confidence interval: the rows of every set are resampled with replacement
    (the same rows of each, so paired measures such as `cka(x, y)` or a probe's accuracy on `(activations, labels)`
    keep their pairing) `n_resamples` times and the measure recomputed.

    `sets`: tensors, arrays or sequences with one row per input (a `(trace or store, hook)` pair is read with
    `as_matrix`); `measure` returns a number. `interval="percentile"` takes the resampled values' quantiles;
    `"bca"` corrects them for bias and skew (Efron 1987), with the acceleration from a leave-one-row-out jackknife
    (n more calls). The same `seed` gives the same interval. Resampling repeats rows, which biases measures that
    count distinct inputs (CKA and binned MI grow, effective rank shrinks with duplicates): prefer debiased forms,
    or `"bca"`, which corrects for the median bias.

    Every scalar the analyses report gets its interval this way, e.g. `bootstrap(nm.analysis.cka, x, y)`,
    `bootstrap(lambda a: neuron_statistics(a).std[7], acts)` or `bootstrap(lambda a, y: mutual_information(a, y).mi[3],
    acts, labels)`.
    """
    if interval not in INTERVALS:
        raise InputError(f"unknown interval {interval!r}: choose one of {', '.join(map(repr, INTERVALS))}")
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 2:
        raise InputError(f"n_resamples must be an int of at least 2, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    if not sets:
        raise InputError("bootstrap needs at least one set of rows to resample")
    sets = tuple(_rows(s) for s in sets)
    n = len(sets[0])
    for i, s in enumerate(sets):
        if len(s) != n:
            raise InputError(f"set 0 has {n:,} rows and set {i} {len(s):,}: bootstrap resamples the same rows of each")
    if n < 2:
        raise InputError(f"bootstrap needs at least 2 rows, got {n}")

    def at(rows: np.ndarray) -> float:
        return _scalar(measure(*(_take(s, rows) for s in sets)))

    value = _scalar(measure(*sets))
    rng = np.random.default_rng(seed)
    distribution = np.array([at(rng.integers(0, n, n)) for _ in range(n_resamples)])
    bad = int((~np.isfinite(distribution)).sum())
    if bad:
        raise InputError(f"the measure gave NaN or infinity on {bad:,} of {n_resamples:,} resamples")
    alpha = (1 - confidence) / 2
    levels = (alpha, 1 - alpha) if interval == "percentile" else _bca_levels(at, value, distribution, n, alpha)
    low, high = np.quantile(distribution, levels)
    return Estimate(value, low, high, confidence, n_resamples, interval=interval,
                    distribution=torch.from_numpy(distribution))


def correct_pvalues(p: Any, method: str = "bh") -> torch.Tensor:
    """p-values adjusted for testing them all at once, in their input shape (float64): `"bonferroni"` (`p·m`,
    family-wise error), `"holm"` (step-down Bonferroni, family-wise error, never larger) or `"bh"`
    (Benjamini–Hochberg, false discovery rate); each capped at 1. Compare the adjusted values with α."""
    if method not in CORRECTIONS:
        raise InputError(f"unknown correction {method!r}: choose one of {', '.join(map(repr, CORRECTIONS))}")
    values = torch.as_tensor(np.asarray(p, dtype=np.float64) if not isinstance(p, torch.Tensor) else p)
    values = values.detach().to(device="cpu", dtype=torch.float64)
    flat = values.flatten()
    if len(flat) == 0:
        return values.clone()
    if not torch.isfinite(flat).all() or (flat < 0).any() or (flat > 1).any():
        raise InputError("p-values must be finite numbers in [0, 1]; "
                         f"got {int((~torch.isfinite(flat)).sum())} NaN/inf and {int(((flat < 0) | (flat > 1)).sum())} "
                         "outside [0, 1]")
    m = len(flat)
    if method == "bonferroni":
        return (values * m).clamp(max=1)
    order = torch.argsort(flat, stable=True)
    ranked = flat[order]
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    if method == "holm":
        adjusted = torch.cummax(ranked * (m - ranks + 1), 0).values
    else:
        adjusted = torch.cummin((ranked * m / ranks).flip(0), 0).values.flip(0)
    out = torch.empty_like(flat)
    out[order] = adjusted.clamp(max=1)
    return out.reshape(values.shape)


def significant(p: Any, alpha: float = 0.05, method: str = "bh") -> torch.Tensor:
    """Which tests reject at level `alpha` after `correct_pvalues(p, method)` (a bool tensor, in `p`'s shape)."""
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
    return correct_pvalues(p, method) <= alpha


def _bca_levels(at: Callable[[np.ndarray], float], value: float, distribution: np.ndarray, n: int,
                alpha: float) -> tuple[float, float]:
    """The quantile levels of Efron's bias-corrected and accelerated interval."""
    import scipy.special

    below = float((distribution < value).mean())
    if below in (0.0, 1.0):
        raise InputError("every resampled value lies on one side of the estimate: the BCa interval is undefined "
                         "(use interval='percentile')")
    bias = scipy.special.ndtri(below)
    every = np.arange(n)
    jackknife = np.array([at(np.delete(every, i)) for i in range(n)])
    spread = jackknife.mean() - jackknife
    denominator = 6 * (spread**2).sum() ** 1.5
    acceleration = (spread**3).sum() / denominator if denominator > 0 else 0.0
    levels = []
    for z in scipy.special.ndtri([alpha, 1 - alpha]):
        levels.append(float(scipy.special.ndtr(bias + (bias + z) / (1 - acceleration * (bias + z)))))
    return levels[0], levels[1]


def _rows(source: Any) -> Any:
    """A set as something indexable by an array of rows."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], str):
        return as_matrix(*source)
    if isinstance(source, (torch.Tensor, np.ndarray)):
        if source.ndim == 0:
            raise InputError("a set to resample needs one row per input, got a scalar")
        return source
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return np.asarray(source)
    raise InputError(f"cannot resample the rows of a {type(source).__name__}: give a tensor, array or sequence")


def _take(source: Any, rows: np.ndarray) -> Any:
    if isinstance(source, torch.Tensor):
        return source[torch.from_numpy(rows).to(source.device)]
    return source[rows]


def _scalar(result: Any) -> float:
    if isinstance(result, Estimate):
        return result.value
    try:
        return float(result)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"bootstrap's measure must return one number, got a {type(result).__name__}") from None


def _decimals(width: float, value: float) -> int:
    """Decimals that show the interval's width to its first significant digit (at least 2, at most 8)."""
    scale = width if width > 0 else abs(value)
    if not scale > 0 or not math.isfinite(scale):
        return 2
    return int(min(8, max(2, -math.floor(math.log10(scale)))))
