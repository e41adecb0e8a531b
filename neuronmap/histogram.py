"""A histogram as inline SVG (no script, no network) and as a plotly figure: the shared view for distributions
(feature densities, activation values)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .display import escape

_CSS = """
.nm-hist{font:11px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#222;margin:4px 0}
.nm-hist .nm-hist-title{font-weight:600;margin-bottom:2px}
.nm-hist .nm-hist-note{color:#666}
"""


def histogram_svg(counts: Sequence[float], edges: Sequence[float], *, title: str = "", x_label: str = "",
                  note: str = "", width: int = 360, height: int = 120, colour: str = "#4c72b0") -> str:
    """Bars of `counts` between consecutive `edges` (len(edges) == len(counts) + 1), axis ends labelled, each bar's
    range and count in its tooltip (`<title>`)."""
    counts = [float(c) for c in counts]
    edges = [float(e) for e in edges]
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(counts)} counts need {len(counts) + 1} edges, got {len(edges)}")
    top = max(counts, default=0.0) or 1.0
    pad_left, pad_bottom, plot_h = 34, 16, height - 22
    bar_w = (width - pad_left) / max(len(counts), 1)
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / top
        tip = f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {count:,.0f}"
        bars.append(
            f'<rect x="{pad_left + i * bar_w:.1f}" y="{4 + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{escape(tip)}</title></rect>'
        )
    axis_y = 4 + plot_h
    labels = (
        f'<text x="{pad_left}" y="{height - 3}" font-size="10">{escape(_tick(edges[0]))}</text>'
        f'<text x="{width}" y="{height - 3}" font-size="10" text-anchor="end">{escape(_tick(edges[-1]))}</text>'
        f'<text x="{(pad_left + width) / 2:.0f}" y="{height - 3}" font-size="10" text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="{pad_left - 3}" y="12" font-size="10" text-anchor="end">{escape(_tick(top))}</text>'
        f'<text x="{pad_left - 3}" y="{axis_y}" font-size="10" text-anchor="end">0</text>'
        f'<line x1="{pad_left}" y1="{axis_y}" x2="{width}" y2="{axis_y}" stroke="#999"/>'
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + pad_bottom - 16}" '
        f'role="img" aria-label="{escape(title or x_label)}">{"".join(bars)}{labels}</svg>'
    )
    head = f'<div class="nm-hist-title">{escape(title)}</div>' if title else ""
    tail = f'<div class="nm-hist-note">{escape(note)}</div>' if note else ""
    return f'<div class="nm-hist"><style>{_CSS}</style>{head}{svg}{tail}</div>'


def histogram_figure(counts: Sequence[float], edges: Sequence[float], *, title: str = "", x_label: str = "") -> Any:
    """The same histogram as a plotly bar chart."""
    import plotly.graph_objects as go

    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    figure = go.Figure(go.Bar(x=centres, y=list(counts), width=widths, marker_color="#4c72b0"))
    figure.update_layout(title=title, xaxis_title=x_label, yaxis_title="count", bargap=0.02, template="plotly_white")
    return figure


def _tick(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
