"""A scatter plot as inline SVG (no script, no network) and as a plotly figure (2D or 3D): the shared view for points
in a plane (projections of activations, clusters), coloured by a label (a legend) or a value (a colour bar), each
point's hover text in its tooltip.

The SVG draws at most `max_points` points (a seeded random subsample, said in a note), so its size stays bounded
whatever the number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .display import escape, text_colour
from .errors import InputError
from .heatmap import BLUE, HOVER_CHARS, RED, hex_colour, mix
from .linechart import PALETTE

OTHER = "#8c8c8c"
"""The colour of points whose label is not among the `len(PALETTE) - 1` most frequent ones (legend: "other")."""
MAX_CATEGORIES = len(PALETTE) - 1
"""Labels given their own colour; rarer ones share `OTHER` (the last palette colour, grey, is kept for it)."""
_CSS = """
.nm-scatter{font:11px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#222;margin:4px 0}
.nm-scatter .nm-sc-title{font-weight:600;margin-bottom:2px}
.nm-scatter .nm-sc-note{color:#666}
.nm-scatter .nm-sc-key{display:inline-block;margin-right:12px}
.nm-scatter .nm-sc-swatch{display:inline-block;width:9px;height:9px;border-radius:50%;vertical-align:middle;
margin-right:4px;border:1px solid #555}
"""


def scatter_svg(points: Any, *, colours_by: Sequence[Any] | None = None, hover: Sequence[str] | None = None,
                title: str = "", x_label: str = "", y_label: str = "", max_points: int = 2000, seed: int = 0,
                width: int = 420, height: int = 340) -> str:
    """Points `[n, 2]` drawn to scale, coloured by `colours_by` (one label or number per point: strings, booleans
    and few distinct integers are categories with a legend, other numbers a colour scale with a colour bar), each
    point's row, coordinates, colour value and `hover` text (escaped, cut to `HOVER_CHARS`) in its tooltip.

    More than `max_points` points: a random subsample of `max_points` (fixed by `seed`) is drawn, and a note says
    "showing m of n points"; the axes and legend counts still cover every point.
    """
    xy = _points(points, (2,))
    n = len(xy)
    colouring = _colouring(colours_by, n)
    hover = _hover(hover, n)
    shown = _subsample(n, max_points, seed)
    left, right, top, bottom = 44, 10, 8, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    (x_low, x_high), (y_low, y_high) = _span(xy[:, 0]), _span(xy[:, 1])

    def px(value: float) -> float:
        return left + plot_w * (value - x_low) / (x_high - x_low)

    def py(value: float) -> float:
        return top + plot_h * (y_high - value) / (y_high - y_low)

    parts = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>']
    for value in (y_low, y_high):
        parts.append(f'<text x="{left - 3}" y="{py(value) + 3:.1f}" font-size="10" text-anchor="end">'
                     f"{escape(_tick(value))}</text>")
    for value, anchor in ((x_low, "start"), (x_high, "end")):
        parts.append(f'<text x="{px(value):.1f}" y="{top + plot_h + 12}" font-size="10" text-anchor="{anchor}">'
                     f"{escape(_tick(value))}</text>")
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" font-size="10" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    parts.append(f'<text x="10" y="{top + plot_h / 2:.0f}" font-size="10" text-anchor="middle" '
                 f'transform="rotate(-90 10 {top + plot_h / 2:.0f})">{escape(y_label)}</text>')
    radius = 3.0 if len(shown) <= 500 else 2.2
    for i in shown:
        tip = f"row {i}: ({_tick(xy[i, 0])}, {_tick(xy[i, 1])})"
        if colouring is not None:
            tip += f" {colouring.describe(i)}"
        if hover is not None:
            tip += f"\n{_cut(str(hover[i]))}"
        parts.append(f'<circle cx="{px(xy[i, 0]):.1f}" cy="{py(xy[i, 1]):.1f}" r="{radius}" '
                     f'fill="{colouring.fill(i) if colouring else PALETTE[0]}" fill-opacity="0.8" stroke="#444" '
                     f'stroke-width="0.3"><title>{escape(tip)}</title></circle>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title or "scatter plot")}">{"".join(parts)}</svg>')
    head = f'<div class="nm-sc-title">{escape(title)}</div>' if title else ""
    key = colouring.key() if colouring is not None else ""
    note = f'<div class="nm-sc-note">showing {len(shown):,} of {n:,} points</div>' if len(shown) < n else ""
    return f'<div class="nm-scatter"><style>{_CSS}</style>{head}{svg}{key}{note}</div>'


def scatter_figure(points: Any, *, colours_by: Sequence[Any] | None = None, hover: Sequence[str] | None = None,
                   title: str = "", x_label: str = "", y_label: str = "", z_label: str = "",
                   max_points: int = 20_000, seed: int = 0) -> Any:
    """The same scatter as a plotly figure: 3D (`Scatter3d`) when `points` has 3 columns; one trace per category
    (a legend) or one trace with a colour bar; hover text escaped. More than `max_points` points: a seeded subsample,
    said in the title."""
    import plotly.graph_objects as go

    xyz = _points(points, (2, 3))
    n = len(xyz)
    colouring = _colouring(colours_by, n)
    hover = _hover(hover, n)
    shown = _subsample(n, max_points, seed)
    texts = {int(i): escape(_cut(str(hover[i]))) if hover is not None else f"row {i}" for i in shown}
    three = xyz.shape[1] == 3
    trace_type = go.Scatter3d if three else go.Scatter

    def trace(rows: np.ndarray, **style: Any) -> Any:
        coordinates = {axis: xyz[rows, j] for j, axis in enumerate("xyz"[: xyz.shape[1]])}
        return trace_type(**coordinates, mode="markers", hovertext=[texts[i] for i in rows], hoverinfo="text",
                          **style)

    figure = go.Figure()
    size = 3 if three else 6
    if colouring is None:
        figure.add_trace(trace(shown, marker={"size": size, "color": PALETTE[0]}, showlegend=False))
    elif colouring.categorical:
        for code, (name, colour, _) in enumerate(colouring.categories):
            rows = shown[colouring.codes[shown] == (code if name is not None else -1)]
            figure.add_trace(trace(rows, name=escape(name if name is not None else "other"),
                                   marker={"size": size, "color": colour}))
    else:
        scale = [[0.0, hex_colour(BLUE)], [0.5, "#ffffff"], [1.0, hex_colour(RED)]] if colouring.diverging else \
            [[0.0, hex_colour(mix(BLUE, 0.1))], [1.0, hex_colour(BLUE)]]
        figure.add_trace(trace(shown, showlegend=False, marker={
            "size": size, "color": colouring.values[shown], "colorscale": scale, "cmin": colouring.low,
            "cmax": colouring.high, "colorbar": {"thickness": 12}, "line": {"width": 0.3, "color": "#444"}}))
    if len(shown) < n:
        title = f"{title} (showing {len(shown):,} of {n:,} points)".strip()
    figure.update_layout(title=escape(title), template="plotly_white", legend={"itemsizing": "constant"})
    if three:
        figure.update_layout(scene={"xaxis_title": escape(x_label), "yaxis_title": escape(y_label),
                                    "zaxis_title": escape(z_label)})
    else:
        figure.update_layout(xaxis_title=escape(x_label), yaxis_title=escape(y_label))
    return figure


class _Colouring:
    """How each point is coloured: by category (codes into the legend's colours) or by value (a colour scale)."""

    def __init__(self, values: Sequence[Any], n: int):
        array = np.asarray(values, dtype=object)
        if array.ndim != 1 or len(array) != n:
            raise InputError(f"colours_by needs one label or value per point ({n}), got shape {list(array.shape)}")
        numbers = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                      for v in array)
        floats = np.asarray(array, dtype=np.float64) if numbers else None
        integral = numbers and bool(np.all(np.isfinite(floats))) and bool(np.all(floats == np.round(floats)))
        self.categorical = not numbers or (integral and len(np.unique(floats)) <= 20)
        if self.categorical:
            self.names = np.asarray([str(int(v)) if numbers else str(v) for v in array], dtype=object)
            names, counts = np.unique(self.names, return_counts=True)
            order = sorted(range(len(names)), key=lambda j: (-counts[j], _natural(names[j])))
            kept = sorted(order[:MAX_CATEGORIES], key=lambda j: _natural(names[j]))
            index = {names[j]: c for c, j in enumerate(kept)}
            self.codes = np.asarray([index.get(name, -1) for name in self.names])
            self.categories = [(names[j], PALETTE[c], int(counts[j])) for c, j in enumerate(kept)]
            rest = int(sum(counts[j] for j in order[MAX_CATEGORIES:]))
            if rest:
                self.categories.append((None, OTHER, rest))
        else:
            self.values = floats
            finite = floats[np.isfinite(floats)]
            self.low, self.high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
            self.diverging = self.low < 0 < self.high
            if self.diverging:
                self.low, self.high = -max(-self.low, self.high), max(-self.low, self.high)

    def fill(self, i: int) -> str:
        if self.categorical:
            return PALETTE[self.codes[i]] if self.codes[i] >= 0 else OTHER
        return hex_colour(self._rgb(self.values[i]))

    def describe(self, i: int) -> str:
        return f"[{self.names[i]}]" if self.categorical else f"value {_tick(self.values[i])}"

    def key(self) -> str:
        if self.categorical:
            return "<div>" + "".join(
                f'<span class="nm-sc-key"><span class="nm-sc-swatch" style="background:{colour}"></span>'
                f"{escape(name if name is not None else 'other')} ({count:,})</span>"
                for name, colour, count in self.categories
            ) + "</div>"
        steps = 5
        cells = []
        for s in range(steps):
            value = self.low + (self.high - self.low) * s / (steps - 1)
            rgb = self._rgb(value)
            cells.append(f'<span style="display:inline-block;padding:0 6px;background:{hex_colour(rgb)};'
                         f'color:{text_colour(rgb)}">{escape(_tick(value))}</span>')
        return f'<div class="nm-sc-bar">colour: {"".join(cells)}</div>'

    def _rgb(self, value: float) -> tuple[int, int, int]:
        if not math.isfinite(value):
            return (255, 255, 255)
        if self.diverging:
            depth = value / self.high if self.high else 0.0
            return mix(RED, depth) if depth >= 0 else mix(BLUE, -depth)
        span = self.high - self.low
        return mix(BLUE, 0.1 + 0.9 * ((value - self.low) / span if span else 1.0))


def _colouring(values: Sequence[Any] | None, n: int) -> _Colouring | None:
    return None if values is None else _Colouring(values, n)


def _points(points: Any, columns: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(points.detach().cpu() if hasattr(points, "detach") else points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] not in columns:
        wanted = " or ".join(str(c) for c in columns)
        raise InputError(f"points must be [n, {wanted}], got shape {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise InputError("points must be finite numbers")
    return array


def _hover(hover: Sequence[str] | None, n: int) -> Sequence[str] | None:
    """`hover` checked for one text per point; only the drawn points' texts are read (it may compute them lazily)."""
    if hover is None:
        return None
    if len(hover) != n:
        raise InputError(f"hover needs one text per point ({n}), got {len(hover)}")
    return hover


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Every row, or `max_points` rows drawn without replacement (sorted), the same for the same seed."""
    if max_points < 1:
        raise InputError(f"max_points must be at least 1, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _span(values: np.ndarray) -> tuple[float, float]:
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = (high - low) * 0.04 or max(abs(low), 1.0) * 0.5
    return low - pad, high + pad


def _natural(name: str) -> tuple:
    """Sort key putting numeric labels in numeric order ("2" before "10")."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)


def _cut(text: str) -> str:
    return text if len(text) <= HOVER_CHARS else text[: HOVER_CHARS - 1] + "…"


def _tick(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
