"""`Clusters`: a cluster label for every row, rendered as a table of clusters (size, most frequent tokens, rows
nearest the centre in context), the rows' 2D principal components coloured by cluster, the silhouette by k when k
was chosen, and the dendrogram (its top merges) for agglomerative clustering."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..heatmap import HOVER_CHARS
from ..linechart import line_chart_figure, line_chart_svg
from ..scatter import scatter_figure, scatter_svg

DENDROGRAM_LEAVES = 30
"""The dendrogram shows the last merges down to this many leaves (each leaf a row or a merged group, "(n)")."""


class ClusterSummary(NamedTuple):
    """One cluster: its label (-1: noise), how many rows, its most frequent tokens with their counts, and the rows
    nearest its centre in context (or their row numbers when the source has no tokens)."""

    cluster: int
    size: int
    top_tokens: list[tuple[str, int]]
    examples: list[str]


class Clusters(Renders):
    """`.labels[i]`: the cluster of row `i` (-1 for DBSCAN's noise) found by `.method`; `.silhouette` and
    `.calinski_harabasz` score it (NaN when there are fewer than 2 clusters), `.summaries` list each cluster,
    `.silhouette_by_k` is the curve k was chosen on (k-means without k), `.linkage` the merge tree
    (agglomerative), `.coordinates` the rows' first two principal components (the scatter's axes)."""

    def __init__(self, labels: np.ndarray, method: str, *, silhouette: float, calinski_harabasz: float,
                 coordinates: torch.Tensor, summaries: list[ClusterSummary], hover: Sequence[str] | None = None,
                 silhouette_by_k: dict[int, float] | None = None, linkage: np.ndarray | None = None):
        self.labels, self.method = labels, method
        self.silhouette, self.calinski_harabasz = silhouette, calinski_harabasz
        self.coordinates, self.summaries, self.silhouette_by_k, self.linkage = (
            coordinates, summaries, silhouette_by_k, linkage)
        self.hover = hover if hover is not None and len(hover) == len(labels) else None

    @property
    def k(self) -> int:
        """The number of clusters (noise not counted)."""
        return int(len(np.unique(self.labels[self.labels >= 0])))

    def members(self, cluster: int) -> np.ndarray:
        """The rows in `cluster` (-1: DBSCAN's noise), in order."""
        rows = np.flatnonzero(self.labels == cluster)
        if len(rows) == 0:
            found = ", ".join(str(s.cluster) for s in self.summaries)
            raise InputError(f"there is no cluster {cluster!r}; the clusters are {found}")
        return rows

    def to_numpy(self) -> np.ndarray:
        """`.labels`."""
        return self.labels

    def __repr__(self) -> str:
        noise = int((self.labels < 0).sum())
        extra = f", {noise:,} noise" if noise else ""
        return (f"Clusters({self.method}, k={self.k}, {len(self.labels):,} rows{extra}, silhouette "
                f"{self.silhouette:.3f}, Calinski–Harabasz {self.calinski_harabasz:.4g})")

    def figure(self) -> Any:
        """A plotly scatter of the rows' first two principal components coloured by cluster; beside it, for
        agglomerative clustering, the dendrogram of the top merges."""
        scatter = scatter_figure(self._points(), colours_by=self._names(), hover=self.hover, **self._titles())
        if self.linkage is None:
            return scatter
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        figure = make_subplots(1, 2, subplot_titles=(escape(self._titles()["title"]), "dendrogram (top merges)"))
        for trace in scatter.data:
            figure.add_trace(trace, 1, 1)
        tree = self._dendrogram()
        for xs, ys in zip(tree["icoord"], tree["dcoord"]):
            figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#555", "width": 1},
                                        hoverinfo="skip", showlegend=False), 1, 2)
        ticks = [5 + 10 * i for i in range(len(tree["ivl"]))]
        figure.update_xaxes(tickvals=ticks, ticktext=[escape(v) for v in tree["ivl"]], row=1, col=2)
        figure.update_layout(template="plotly_white")
        return figure

    def silhouette_figure(self) -> Any:
        """A plotly line chart of the silhouette by k (k-means with k chosen)."""
        if self.silhouette_by_k is None:
            raise InputError("the silhouette by k exists when kmeans chose k (k=None)")
        return line_chart_figure(**self._curve())

    def _repr_html_(self) -> str:
        parts = [f'<div style="font:600 12px system-ui,sans-serif;margin:4px 0">{escape(repr(self))}</div>']
        tokens = any(s.top_tokens for s in self.summaries)
        rows = [["noise" if s.cluster < 0 else s.cluster, s.size,
                 *([", ".join(f"{token!r} ×{count}" for token, count in s.top_tokens)] if tokens else []),
                 " | ".join(_cut(e) for e in s.examples)] for s in self.summaries]
        headers = ["cluster", "rows", *(["most frequent tokens"] if tokens else []), "nearest the centre"]
        parts.append(html_table("clusters", headers, rows, numeric=(1,)))
        parts.append(scatter_svg(self._points(), colours_by=self._names(), hover=self.hover, **self._titles()))
        if self.silhouette_by_k is not None:
            parts.append(line_chart_svg(**self._curve()))
        if self.linkage is not None:
            parts.append(self._dendrogram_svg())
        return f"<div>{''.join(parts)}</div>"

    def _points(self) -> np.ndarray:
        points = self.coordinates.numpy()
        return points if points.shape[1] == 2 else np.column_stack([points[:, 0], np.zeros(len(points))])

    def _names(self) -> list[str]:
        return ["noise" if label < 0 else str(label) for label in self.labels]

    def _titles(self) -> dict[str, str]:
        return {"title": f"{self.method}: rows on their first two principal components", "x_label": "PC1",
                "y_label": "PC2"}

    def _curve(self) -> dict[str, Any]:
        ks = sorted(self.silhouette_by_k)
        return {"x": ks, "series": {"silhouette": [self.silhouette_by_k[k] for k in ks]},
                "title": f"silhouette by k (chosen: k={self.k})", "x_label": "k", "y_label": "mean silhouette"}

    def _dendrogram(self) -> dict[str, Any]:
        from scipy.cluster.hierarchy import dendrogram

        return dendrogram(self.linkage, truncate_mode="lastp", p=DENDROGRAM_LEAVES, no_plot=True)

    def _dendrogram_svg(self, width: int = 420, height: int = 220) -> str:
        """The top merges as lines (x: leaves 5, 15, ... in scipy's layout; y: merge distance), a dashed line where
        the tree was cut into `.k` clusters."""
        tree = self._dendrogram()
        leaves = len(tree["ivl"])
        top = max((max(ys) for ys in tree["dcoord"]), default=1.0) or 1.0
        left, bottom, plot_h = 40, 40, height - 50

        def px(value: float) -> float:
            return left + (width - left - 6) * value / (10 * leaves)

        def py(value: float) -> float:
            return 6 + plot_h * (1 - value / top)

        parts = [f'<polyline points="{" ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(xs, ys))}" fill="none" '
                 f'stroke="#555" stroke-width="1"/>' for xs, ys in zip(tree["icoord"], tree["dcoord"])]
        for i, leaf in enumerate(tree["ivl"]):
            x = px(5 + 10 * i)
            parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" font-size="9" text-anchor="end" '
                         f'transform="rotate(-60 {x:.1f} {height - bottom + 14})">{escape(leaf)}</text>')
        parts.append(f'<text x="{left - 3}" y="{py(top) + 3:.1f}" font-size="10" text-anchor="end">{top:.3g}</text>'
                     f'<text x="{left - 3}" y="{py(0) + 3:.1f}" font-size="10" text-anchor="end">0</text>')
        if 1 < self.k <= len(self.linkage):
            cut = (self.linkage[-self.k, 2] + self.linkage[-self.k + 1, 2]) / 2
            if math.isfinite(cut):
                parts.append(f'<line x1="{left}" y1="{py(cut):.1f}" x2="{width}" y2="{py(cut):.1f}" stroke="#c44e52" '
                             f'stroke-dasharray="4 3"><title>cut into {self.k} clusters at {cut:.3g}</title></line>')
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
               f'aria-label="dendrogram">{"".join(parts)}</svg>')
        note = (f"dendrogram: the last {leaves - 1} merges; a leaf is a row or (n) rows merged below"
                if leaves < len(self.labels) else "dendrogram: every merge")
        return (f'<div style="font:11px ui-monospace,monospace;margin:4px 0"><div style="font-weight:600">'
                f"{escape(note)}</div>{svg}</div>")


def _cut(text: str) -> str:
    return text if len(text) <= HOVER_CHARS else text[: HOVER_CHARS - 1] + "…"
