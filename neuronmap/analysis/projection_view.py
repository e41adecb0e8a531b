"""`Projection`: every row's coordinates in a few dimensions (PCA, t-SNE or UMAP), rendered as a scatter coloured by
label with each row's token in context on hover; for PCA also the explained-variance curve and the effective
dimensionality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..linechart import line_chart_figure, line_chart_svg
from ..scatter import scatter_figure, scatter_svg
from .activations import as_matrix

CURVE_POINTS = 200
"""The explained-variance curve shows at most this many leading components (the numbers below it use them all)."""


class Projection(Renders):
    """`.coordinates [rows, k]` of each row by `.method`, with optional `.labels` (colours) and `.hover` (each row's
    token in context). For PCA: `.components [k, features]`, `.mean`, `.eigenvalues` and
    `.explained_variance_ratio` (the whole spectrum, one per dimension), `.participation_ratio`,
    `.dimensions_for(fraction)` and `.transform(x)`."""

    def __init__(self, coordinates: torch.Tensor, method: str, *, labels: np.ndarray | None = None,
                 hover: Sequence[str] | None = None, components: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None, eigenvalues: torch.Tensor | None = None):
        self.coordinates, self.method, self.labels = coordinates, method, labels
        self.hover = hover if hover is not None and len(hover) == len(coordinates) else None
        self.components, self.mean, self.eigenvalues = components, mean, eigenvalues

    @property
    def explained_variance_ratio(self) -> torch.Tensor | None:
        """Each principal component's share of the total variance, for every dimension (PCA only)."""
        if self.eigenvalues is None:
            return None
        total = self.eigenvalues.sum()
        return self.eigenvalues / total if total > 0 else torch.zeros_like(self.eigenvalues)

    @property
    def participation_ratio(self) -> float | None:
        """`(Σλ)² / Σλ²` of the covariance eigenvalues: the effective number of dimensions (PCA only)."""
        return None if self.eigenvalues is None else participation_ratio(self.eigenvalues)

    def dimensions_for(self, fraction: float = 0.95) -> int:
        """The fewest principal components that explain `fraction` of the variance (PCA only)."""
        return dimensions_for(self._pca("dimensions_for").eigenvalues, fraction)

    def transform(self, x: Any, hook: str | None = None) -> torch.Tensor:
        """New rows (anything `as_matrix` reads) on the same principal components: `(x - mean) @ components.T`."""
        self._pca("transform")
        matrix = as_matrix(x, hook)
        if matrix.shape[1] != self.components.shape[1]:
            raise InputError(f"x has {matrix.shape[1]} features; the components have {self.components.shape[1]}")
        return (matrix - self.mean) @ self.components.T

    def to_numpy(self) -> np.ndarray:
        """`.coordinates` as a numpy array."""
        return self.coordinates.numpy()

    def __repr__(self) -> str:
        rows, k = self.coordinates.shape
        extra = ""
        if self.eigenvalues is not None:
            shown = float(self.explained_variance_ratio[:k].sum())
            extra = (f", {shown:.1%} of the variance, participation ratio {self.participation_ratio:.3g}, "
                     f"95% in {self.dimensions_for(0.95)} of {len(self.eigenvalues)} dims")
        return f"Projection({self.method}, {rows:,} rows → {k} dims{extra})"

    def figure(self) -> Any:
        """A plotly scatter of the first 2 or 3 coordinates (3D when there are 3), coloured by `.labels`."""
        return scatter_figure(self._points(3), colours_by=self._colours(), hover=self.hover, **self._titles(),
                              z_label=self._axis(2))

    def variance_figure(self) -> Any:
        """A plotly line chart of the explained variance by component, each and cumulative (PCA only)."""
        return line_chart_figure(**self._curve())

    def _repr_html_(self) -> str:
        parts = [f'<div style="font:600 12px system-ui,sans-serif;margin:4px 0">{escape(repr(self))}</div>']
        parts.append(scatter_svg(self._points(2), colours_by=self._colours(), hover=self.hover, **self._titles()))
        if self.eigenvalues is not None:
            parts.append(line_chart_svg(**self._curve()))
            ratio = self.explained_variance_ratio
            rows = [["participation ratio (Σλ)²/Σλ²", f"{self.participation_ratio:.2f}"],
                    ["components for 95% of the variance", self.dimensions_for(0.95)],
                    ["components for 99% of the variance", self.dimensions_for(0.99)],
                    [f"variance in the {self.coordinates.shape[1]} shown",
                     f"{float(ratio[: self.coordinates.shape[1]].sum()):.1%}"],
                    ["dimensions (features)", self.components.shape[1]]]
            parts.append(html_table("effective dimensionality", ["measure", "value"], rows, numeric=(1,)))
        return f"<div>{''.join(parts)}</div>"

    def _curve(self) -> dict[str, Any]:
        ratio = self._pca("the explained-variance curve").explained_variance_ratio[:CURVE_POINTS]
        cumulative = torch.cumsum(self.explained_variance_ratio, 0)[:CURVE_POINTS]
        shown = len(ratio)
        more = f" (first {shown} of {len(self.eigenvalues)})" if shown < len(self.eigenvalues) else ""
        return {"x": list(range(1, shown + 1)),
                "series": {"each": ratio.tolist(), "cumulative": cumulative.tolist()},
                "marks": {"95%": 0.95, "99%": 0.99}, "title": f"explained variance by component{more}",
                "x_label": "component", "y_label": "fraction of variance"}

    def _points(self, most: int) -> np.ndarray:
        """Up to `most` leading coordinates; one coordinate is drawn against 0."""
        points = self.coordinates[:, :most].numpy()
        return points if points.shape[1] >= 2 else np.column_stack([points[:, 0], np.zeros(len(points))])

    def _titles(self) -> dict[str, str]:
        rows = len(self.coordinates)
        return {"title": f"{self.method} of {rows:,} rows", "x_label": self._axis(0), "y_label": self._axis(1)}

    def _axis(self, i: int) -> str:
        if i >= self.coordinates.shape[1]:
            return ""
        if self.eigenvalues is None:
            return f"{self.method} {i + 1}"
        return f"PC{i + 1} ({float(self.explained_variance_ratio[i]):.1%})"

    def _colours(self) -> list[Any] | None:
        return None if self.labels is None else self.labels.tolist()

    def _pca(self, what: str) -> Projection:
        if self.eigenvalues is None:
            raise InputError(f"{what} needs a PCA projection; this one is {self.method}")
        return self


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """`(Σλ)² / Σλ²`: 1 when one direction holds all the variance, d when d directions hold equal shares."""
    total = float(eigenvalues.sum())
    return total**2 / float((eigenvalues**2).sum()) if total > 0 else 0.0


def dimensions_for(eigenvalues: torch.Tensor, fraction: float) -> int:
    """The fewest top components (eigenvalues sorted descending) whose variance reaches `fraction` of the total."""
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction}")
    total = float(eigenvalues.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(eigenvalues, 0) / total
    return min(int((cumulative < fraction - 1e-12).sum()) + 1, len(eigenvalues))
