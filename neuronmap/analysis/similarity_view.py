"""`SimilarityMatrix`: a similarity measure between every pair of activation sets, rendered as a heatmap."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..display import Renders
from ..heatmap import heatmap_figure, heatmap_html

DISTANCES = ("procrustes",)
"""Methods whose values are distances (0 = alike), so the view says that lower means more similar."""


class SimilarityMatrix(Renders):
    """`.values[i, j]`: how alike activation set `.names[i]` (rows) and `.column_names[j]` (columns) are by
    `.method`; the same names both ways when a list was compared with itself. Renders as a bounded heatmap."""

    def __init__(self, values: torch.Tensor, names: list[str], column_names: list[str], method: str):
        self.values, self.names, self.column_names, self.method = values, list(names), list(column_names), method

    def to_numpy(self) -> np.ndarray:
        """`.values` as a numpy array."""
        return self.values.numpy()

    def __repr__(self) -> str:
        finite = self.values[torch.isfinite(self.values)]
        span = f", {float(finite.min()):.3g} to {float(finite.max()):.3g}" if len(finite) else ""
        return f"SimilarityMatrix({self.method}, {len(self.names)} × {len(self.column_names)}{span})"

    @property
    def description(self) -> str:
        return f"{self.method} similarity" if self.method.split(",")[0] not in DISTANCES else f"{self.method} distance"

    def figure(self) -> Any:
        """A plotly heatmap of `.values`."""
        return heatmap_figure(self.values, **self._grid())

    def _repr_html_(self) -> str:
        lower = self.method.split(",")[0] in DISTANCES
        note = "lower = more alike (0 for copies equal up to rotation and scale)" if lower else "higher = more alike"
        return heatmap_html(self.values, **self._grid(), note=note, value_format=".3f")

    def _grid(self) -> dict[str, Any]:
        diverging = bool((self.values < 0).any())
        return {"rows": self.names, "columns": self.column_names, "title": self.description,
                "row_title": "rows", "column_title": "columns", "diverging": diverging}
