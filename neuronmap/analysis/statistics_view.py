"""The result types of `statistics`: per-neuron statistics (`NeuronStatistics`) and per-layer summaries
(`LayerSummary`), each rendered as bounded tables with a histogram or a line chart."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..histogram import histogram_figure, histogram_svg
from ..linechart import line_chart_figure, line_chart_svg

STATISTICS = ("mean", "std", "sparsity", "skewness", "kurtosis", "min", "max")
"""The per-neuron statistics, in the order tables show them."""

TOP_ROWS = 10
HISTOGRAM_BINS = 40


class TopNeurons(NamedTuple):
    """Neuron indices and their values of one statistic, best first."""

    indices: torch.Tensor
    values: torch.Tensor


class NeuronStatistics(Renders):
    """Per-neuron statistics of one activation set over `.rows` rows: `.mean`, `.std` (population), `.sparsity`
    (fraction of rows with |x| <= `.zero_threshold`), `.skewness`, `.kurtosis` (excess; NaN for constant neurons),
    `.min`, `.max`, each a float64 tensor `[features]`. `.top(by=...)` ranks the neurons."""

    def __init__(self, *, name: str, rows: int, zero_threshold: float, **values: torch.Tensor):
        self.name, self.rows, self.zero_threshold = name, rows, zero_threshold
        self.mean, self.std, self.sparsity = values["mean"], values["std"], values["sparsity"]
        self.skewness, self.kurtosis = values["skewness"], values["kurtosis"]
        self.min, self.max = values["min"], values["max"]

    @property
    def features(self) -> int:
        return len(self.mean)

    def top(self, by: str = "mean", k: int = 10, *, largest: bool = True) -> TopNeurons:
        """The `k` neurons with the largest (or smallest) `by` statistic: `"mean"` (most active), `"std"` (most
        variable), `"sparsity"` (sparsest), or any of `STATISTICS`; NaN values come last."""
        if by not in STATISTICS:
            raise InputError(f"unknown statistic {by!r}: choose one of {', '.join(map(repr, STATISTICS))}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        values = getattr(self, by)
        ranked = torch.nan_to_num(values, nan=-torch.inf if largest else torch.inf)
        indices = torch.topk(ranked, min(k, len(values)), largest=largest).indices
        return TopNeurons(indices, values[indices])

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every statistic as a numpy array, by name."""
        return {name: getattr(self, name).numpy() for name in STATISTICS}

    def __repr__(self) -> str:
        return (f"NeuronStatistics({self.name!r}, {self.features:,} neurons over {self.rows:,} rows, "
                f"mean sparsity {float(self.sparsity.mean()):.3g}, largest std {float(self.std.max()):.3g})")

    def figure(self, by: str = "mean") -> Any:
        """A plotly histogram of one statistic over the neurons."""
        counts, edges = self._histogram(by)
        return histogram_figure(counts, edges, title=f"{self.name}: {by} per neuron", x_label=by)

    def _repr_html_(self) -> str:
        summary = [
            [name, *(f"{float(q):.4g}" for q in _quantiles(getattr(self, name)))] for name in STATISTICS
        ]
        parts = [f'<div class="nm-stats"><div style="font-weight:600">{escape(repr(self))}</div>',
                 html_table("across neurons", ["statistic", "min", "median", "max"], summary, numeric=(1, 2, 3))]
        for by, title in (("mean", "most active (largest mean)"), ("std", "most variable (largest std)"),
                          ("sparsity", f"sparsest (|x| <= {self.zero_threshold:g} most often)")):
            indices = self.top(by, TOP_ROWS).indices.tolist()
            rows = [[i, *(f"{float(getattr(self, name)[i]):.4g}" for name in STATISTICS)] for i in indices]
            parts.append(html_table(title, ["neuron", *STATISTICS], rows, numeric=tuple(range(len(STATISTICS) + 1))))
        counts, edges = self._histogram("mean")
        parts.append(histogram_svg(counts, edges, title="mean activation per neuron", x_label="mean",
                                   note=f"{self.features:,} neurons"))
        return "".join(parts) + "</div>"

    def _histogram(self, by: str) -> tuple[list[float], list[float]]:
        values = getattr(self, by)
        values = values[torch.isfinite(values)]
        if len(values) == 0:
            return [0.0], [0.0, 1.0]
        low, high = float(values.min()), float(values.max())
        if high <= low:
            low, high = low - 0.5, high + 0.5
        counts = torch.histc(values, bins=HISTOGRAM_BINS, min=low, max=high)
        return counts.tolist(), torch.linspace(low, high, HISTOGRAM_BINS + 1).tolist()


class LayerSummary(Renders):
    """One row per layer (hook point): `.names`, `.rows`, `.norm_mean` and `.norm_std` of the rows' L2 norms,
    `.effective_rank` (Roy & Vetterli 2007), and `.outliers[name]`: the outlier features (mean |activation| over
    `.outlier_factor` times the median feature's), largest first."""

    def __init__(self, layers: list[dict[str, Any]], outlier_factor: float):
        self.layers, self.outlier_factor = layers, outlier_factor
        self.names = [layer["name"] for layer in layers]
        self.norm_mean = torch.tensor([layer["norm_mean"] for layer in layers], dtype=torch.float64)
        self.norm_std = torch.tensor([layer["norm_std"] for layer in layers], dtype=torch.float64)
        self.effective_rank = torch.tensor([layer["effective_rank"] for layer in layers], dtype=torch.float64)
        self.outliers = {layer["name"]: layer["outliers"] for layer in layers}

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The per-layer columns as numpy arrays (`names`, `norm_mean`, `norm_std`, `effective_rank`,
        `outlier_count`)."""
        return {"names": np.array(self.names), "norm_mean": self.norm_mean.numpy(), "norm_std": self.norm_std.numpy(),
                "effective_rank": self.effective_rank.numpy(),
                "outlier_count": np.array([len(v) for v in self.outliers.values()])}

    def __repr__(self) -> str:
        ranks = ", ".join(f"{r:.3g}" for r in self.effective_rank.tolist()[:6])
        more = ", …" if len(self.names) > 6 else ""
        return f"LayerSummary({len(self.names)} layers, effective rank {ranks}{more})"

    def figure(self) -> Any:
        """A plotly line chart of the effective rank by layer."""
        return line_chart_figure(self.names, {"effective rank": self.effective_rank.tolist()},
                                 title="effective rank by layer", x_label="layer", y_label="effective rank")

    def _repr_html_(self) -> str:
        rows = []
        for layer in self.layers:
            shown = ", ".join(f"{i} ({r:.1f}×)" for i, r in zip(layer["outliers"][:8], layer["outlier_ratios"][:8]))
            more = f" … {len(layer['outliers']) - 8} more" if len(layer["outliers"]) > 8 else ""
            rows.append([layer["name"], f"{layer['rows']:,}", f"{layer['features']:,}", f"{layer['norm_mean']:.4g}",
                         f"{layer['norm_std']:.4g}", f"{layer['effective_rank']:.4g}", shown + more or "none"])
        table = html_table(f"per layer; outliers: mean |x| over {self.outlier_factor:g}× the median feature's",
                           ["layer", "rows", "features", "norm mean", "norm std", "effective rank", "outlier features"],
                           rows, numeric=(1, 2, 3, 4, 5))
        charts = ""
        if len(self.names) > 1:
            charts = line_chart_svg(self.names, {"effective rank": self.effective_rank.tolist()},
                                    title="effective rank by layer", x_label="layer") + line_chart_svg(
                self.names, {"norm": self.norm_mean.tolist()}, title="row norm by layer (band: ± 1 std)",
                x_label="layer", bands={"norm": ((self.norm_mean - self.norm_std).tolist(),
                                                 (self.norm_mean + self.norm_std).tolist())})
        return f'<div class="nm-layers"><div style="font-weight:600">{escape(repr(self))}</div>{table}{charts}</div>'


def _quantiles(values: torch.Tensor) -> list[float]:
    finite = values[torch.isfinite(values)]
    if len(finite) == 0:
        return [float("nan")] * 3
    return [float(finite.min()), float(finite.quantile(0.5)), float(finite.max())]
