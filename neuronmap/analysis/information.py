"""Information measures of neurons: the entropy of each neuron's activations, and the mutual information between each
neuron and a discrete label, with permutation p-values corrected for testing every neuron.

Binned estimates use equal-width bins spanning each neuron's own range (`bins` of width `(max - min) / bins`;
bin `floor((x - min) / (max - min) · bins)`, the maximum in the last bin). The k-NN estimate is scikit-learn's
`mutual_info_classif` (Ross 2014), converted from nats to bits. The binned estimators, streaming and the permutation
test are written here: numpy/scipy/scikit-learn have no per-neuron vectorised versions of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..histogram import histogram_figure, histogram_svg
from .activations import as_matrix
from .rigour import CORRECTIONS, correct_pvalues
from .statistics_view import TopNeurons
from .streaming import labels_array, row_blocks, source_name, store_view

METHODS = ("binned", "knn")
_CHUNK = 1 << 22
"""Entries of a `[rows × neurons]` bin-index array computed at once (bounds memory for wide layers)."""


def neuron_entropy(source: Any, hook: str | None = None, *, bins: int = 32, batch_size: int = 4096) -> torch.Tensor:
    """The Shannon entropy (bits) of each neuron's activations, binned into `bins` equal-width bins over that
    neuron's range (see the module doc): at most `log2(bins)`, 0 for a constant neuron.

    `source`: as `neuron_statistics` (a store, with `hook`, is streamed in two passes: the range, then the counts).
    A plug-in estimate: it depends on `bins`, so compare neurons at the same `bins`.
    """
    _check_bins(bins)
    blocks = _rereadable(source, hook, batch_size)
    low, high, n = _ranges(blocks())
    counts = torch.zeros(len(low) * bins, dtype=torch.float64)
    for block in blocks():
        codes = _codes(block, low, high, bins) + torch.arange(len(low)) * bins
        counts += torch.bincount(codes.flatten(), minlength=len(counts)).to(torch.float64)
    return _entropy(counts.reshape(len(low), bins) / n)


def mutual_information(
    source: Any,
    labels: Any,
    hook: str | None = None,
    *,
    method: str = "binned",
    bins: int = 16,
    k: int = 3,
    permutations: int = 0,
    seed: int = 0,
    correction: str | None = "bh",
) -> InformationResult:
    """The mutual information (bits) between each neuron's activation and a discrete label of each row.

    `labels`: one class (int, str, bool) per row of `as_matrix(source, hook)` (a store is read whole), at least two
    classes.
    `method="binned"`: the plug-in estimate on `bins` equal-width bins per neuron (see the module doc), biased
    upwards by about `(bins - 1)(classes - 1) / (2 n ln 2)` bits; `"knn"`: scikit-learn's `mutual_info_classif`
    with `k` neighbours (Ross 2014), nats converted to bits. With `permutations > 0`, each neuron's p-value is the
    share of label shuffles (the same shuffles for every neuron) giving at least its MI, `(1 + hits) / (1 +
    permutations)`, and `correction` (`"bh"`, `"holm"`, `"bonferroni"`) adjusts them for testing every neuron.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: choose one of {', '.join(map(repr, METHODS))}")
    if correction is not None and correction not in CORRECTIONS:
        raise InputError(f"unknown correction {correction!r}: choose one of {', '.join(map(repr, CORRECTIONS))} or None")
    if not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 0:
        raise InputError(f"permutations must be an int >= 0, got {permutations!r}")
    x = as_matrix(source, hook)
    y, classes = _classes(labels, len(x))
    if method == "binned":
        _check_bins(bins)
        measure = _binned_measure(x, y, bins, len(classes))
    else:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k (neighbours) must be a positive int, got {k!r}")
        measure = _knn_measure(x, k, seed)
    observed = measure(y)
    p_values = corrected = None
    if permutations:
        rng = np.random.default_rng(seed)
        hits = torch.zeros(len(observed), dtype=torch.float64)
        for _ in range(permutations):
            hits += (measure(y[rng.permutation(len(y))]) >= observed - 1e-12).to(torch.float64)
        p_values = (1 + hits) / (1 + permutations)
        corrected = correct_pvalues(p_values, correction) if correction else p_values.clone()
    counts = np.bincount(y) / len(y)
    return InformationResult(
        observed, p_values, corrected, name=source_name(source, hook), method=method,
        setting=f"{bins} bins" if method == "binned" else f"k={k}", correction=correction if permutations else None,
        permutations=permutations, label_entropy=float(-(counts * np.log2(counts)).sum()), classes=len(classes),
    )


class InformationResult(Renders):
    """Mutual information (bits) of each neuron with a label: `.mi` `[features]`; with a permutation test, `.p_values`
    and `.corrected` (adjusted by `.correction`), else None. `.label_entropy` is H(labels), the most any neuron can
    share with them."""

    def __init__(self, mi: torch.Tensor, p_values: torch.Tensor | None, corrected: torch.Tensor | None, *, name: str,
                 method: str, setting: str, correction: str | None, permutations: int, label_entropy: float,
                 classes: int):
        self.mi, self.p_values, self.corrected = mi, p_values, corrected
        self.name, self.method, self.setting, self.correction = name, method, setting, correction
        self.permutations, self.label_entropy, self.classes = permutations, label_entropy, classes

    def top(self, k: int = 10) -> TopNeurons:
        """The `k` neurons sharing the most information with the label."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        top = torch.topk(self.mi, min(k, len(self.mi)))
        return TopNeurons(top.indices, top.values)

    def significant(self, alpha: float = 0.05) -> torch.Tensor:
        """Indices of the neurons whose corrected p-value is at most `alpha` (most informative first)."""
        if self.corrected is None:
            raise InputError("no p-values: run mutual_information with permutations > 0 (e.g. 1000)")
        if not 0 < alpha < 1:
            raise InputError(f"alpha must be in (0, 1), got {alpha!r}")
        chosen = torch.nonzero(self.corrected <= alpha).flatten()
        return chosen[torch.argsort(self.mi[chosen], descending=True, stable=True)]

    def to_numpy(self) -> dict[str, np.ndarray]:
        """`mi` and, with a permutation test, `p_values` and `corrected`, as numpy arrays."""
        out = {"mi": self.mi.numpy()}
        if self.p_values is not None:
            out.update(p_values=self.p_values.numpy(), corrected=self.corrected.numpy())
        return out

    def __repr__(self) -> str:
        tested = f", {len(self.significant())} significant at 0.05 ({self.correction})" if self.corrected is not None else ""
        return (f"InformationResult({self.name!r}, {self.method} MI ({self.setting}) of {len(self.mi):,} neurons with "
                f"{self.classes} classes, max {float(self.mi.max()):.3g} of {self.label_entropy:.3g} bits{tested})")

    def figure(self) -> Any:
        """A plotly histogram of the neurons' mutual information."""
        return histogram_figure(*self._histogram(), title=f"{self.name}: MI with the label per neuron",
                                x_label="mutual information (bits)")

    def _repr_html_(self) -> str:
        headers = ["neuron", "MI (bits)"]
        if self.p_values is not None:
            headers += ["p", f"p ({self.correction or 'uncorrected'})"]
        rows = []
        for i in self.top(20).indices.tolist():
            row = [i, f"{float(self.mi[i]):.4g}"]
            if self.p_values is not None:
                row += [f"{float(self.p_values[i]):.3g}", f"{float(self.corrected[i]):.3g}"]
            rows.append(row)
        caption = f"most informative neurons (H(labels) = {self.label_entropy:.3g} bits)"
        if self.permutations:
            caption += (f"; p from {self.permutations:,} label permutations (the smallest possible p is "
                        f"{1 / (1 + self.permutations):.3g})")
        return (f'<div class="nm-information"><div style="font-weight:600">{escape(repr(self))}</div>'
                + html_table(caption, headers, rows, numeric=tuple(range(len(headers))))
                + histogram_svg(*self._histogram(), title="MI per neuron", x_label="bits",
                                note=f"{len(self.mi):,} neurons") + "</div>")

    def _histogram(self) -> tuple[list[float], list[float]]:
        high = max(float(self.mi.max()), 1e-9)
        return torch.histc(self.mi, bins=30, min=0, max=high).tolist(), torch.linspace(0, high, 31).tolist()


def _binned_measure(x: torch.Tensor, y: np.ndarray, bins: int, n_classes: int):
    """`labels -> MI per neuron` on fixed bins: the codes, H(X) and H(Y) found once, H(X, Y) for each labelling."""
    low, high = x.amin(0), x.amax(0)
    codes = _codes(x, low, high, bins)  # [n, d]
    d = x.shape[1]
    h_x = _entropy(_bin_counts(codes, bins, d) / len(x))
    counts = np.bincount(y, minlength=n_classes) / len(y)
    h_y = float(-(counts * np.log2(counts)).sum())
    offsets = torch.arange(d) * (bins * n_classes)

    def measure(labels: np.ndarray) -> torch.Tensor:
        joint = torch.zeros(d * bins * n_classes, dtype=torch.float64)
        label_tensor = torch.from_numpy(labels)[:, None]
        step = max(1, _CHUNK // max(d, 1))
        for start in range(0, len(codes), step):
            index = codes[start : start + step] * n_classes + label_tensor[start : start + step] + offsets
            joint += torch.bincount(index.flatten(), minlength=len(joint)).to(torch.float64)
        h_xy = _entropy(joint.reshape(d, bins * n_classes) / len(labels))
        return (h_x + h_y - h_xy).clamp(min=0)

    return measure


def _knn_measure(x: torch.Tensor, k: int, seed: int):
    """`labels -> MI per neuron` by scikit-learn's k-NN estimator (Ross 2014), in bits."""
    from sklearn.feature_selection import mutual_info_classif

    features = x.numpy()

    def measure(labels: np.ndarray) -> torch.Tensor:
        nats = mutual_info_classif(features, labels, discrete_features=False, n_neighbors=k, random_state=seed)
        return torch.from_numpy(np.asarray(nats, dtype=np.float64) / math.log(2))

    return measure


def _classes(labels: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as class indices 0..C-1 (and the classes), checked against the number of rows."""
    values = labels_array(labels, rows, "class")
    classes, indices = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"mutual information with a label needs at least 2 classes, got only {classes.tolist()!r}")
    return indices.astype(np.int64), classes


def _codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """Each value's equal-width bin `floor((x - low) / (high - low) · bins)` in its neuron's range, the maximum in
    the last bin; 0 for a constant neuron."""
    span = high - low
    scaled = (x - low) / torch.where(span > 0, span, torch.ones_like(span)) * bins
    return scaled.floor().clamp(0, bins - 1).to(torch.int64)


def _bin_counts(codes: torch.Tensor, bins: int, d: int) -> torch.Tensor:
    index = codes + torch.arange(d) * bins
    return torch.bincount(index.flatten(), minlength=d * bins).to(torch.float64).reshape(d, bins)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of probabilities (0 log 0 = 0)."""
    return -(torch.where(p > 0, p * torch.log2(torch.where(p > 0, p, 1.0)), 0.0)).sum(1)


def _rereadable(source: Any, hook: str | None, batch_size: int):
    """A function giving the blocks of `source` again on each call: a store re-read from disk, anything else read
    once and kept."""
    if store_view(source, hook) is not None:
        return lambda: row_blocks(source, hook, batch_size)
    matrix = next(row_blocks(source, hook, batch_size))
    return lambda: iter([matrix])


def _ranges(blocks: Iterator[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    low = high = None
    n = 0
    for block in blocks:
        if len(block) == 0:
            continue
        block_low, block_high = block.amin(0), block.amax(0)
        low = block_low if low is None else torch.minimum(low, block_low)
        high = block_high if high is None else torch.maximum(high, block_high)
        n += len(block)
    if low is None:
        raise InputError("no rows to measure: the activations are empty")
    return low, high, n


def _check_bins(bins: Any) -> None:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise InputError(f"bins must be an int of at least 2, got {bins!r}")
