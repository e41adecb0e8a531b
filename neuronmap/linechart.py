"""Line charts as inline SVG (no script, no network) and as plotly figures: the shared view for curves (explained
variance by component, probe accuracy or lens KL by layer), with optional shaded bands and reference lines."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .display import escape

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
"""Series colours in order (colour-blind-friendly, each at least 3:1 against white)."""

_CSS = """
.nm-line{font:11px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#222;margin:4px 0}
.nm-line .nm-line-title{font-weight:600;margin-bottom:2px}
.nm-line .nm-line-key{display:inline-block;margin-right:12px}
.nm-line .nm-line-swatch{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}
"""

Bands = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def line_chart_svg(x: Sequence[Any], series: Mapping[str, Sequence[float]], *, title: str = "", x_label: str = "",
                   y_label: str = "", bands: Bands | None = None, marks: Mapping[str, float] | None = None,
                   width: int = 420, height: int = 180) -> str:
    """One line per entry of `series` (`{name: y values}`, one per `x`), points labelled in tooltips; `bands`
    (`{series name: (low, high)}`) shade a confidence band behind a series and `marks` (`{label: y}`) draw dashed
    horizontal reference lines. Numeric `x` is placed to scale, other labels evenly; non-finite y leaves a gap."""
    labels, positions = _x_axis(x)
    lines, band_spans, marks = _checked(series, bands or {}, marks or {}, len(labels))
    finite = [v for ys in lines.values() for v in ys if math.isfinite(v)]
    finite += [v for low, high in band_spans.values() for v in (*low, *high) if math.isfinite(v)]
    finite += list(marks.values())
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    left, right, top, bottom = 44, 8, 6, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    first, last = positions[0], positions[-1]

    def px(position: float) -> float:
        return left + (plot_w * (position - first) / (last - first) if last > first else plot_w / 2)

    def py(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    parts = [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#999"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>']
    for value in (low, high):
        parts.append(f'<text x="{left - 3}" y="{py(value) + 3:.1f}" font-size="10" text-anchor="end">'
                     f"{escape(_tick(value))}</text>")
    ticks = _tick_indices(len(labels))
    texts = _compact(labels)
    room = max(6, int(plot_w / max(1, len(ticks) - 1) / 6.5))  # characters between two ticks, at 10px monospace
    for i in ticks:
        x_at = px(positions[i])  # labels at the plot's ends grow inwards, so the SVG never cuts them
        anchor = "start" if x_at - left < 30 else "end" if left + plot_w - x_at < 30 else "middle"
        parts.append(f'<text x="{x_at:.1f}" y="{top + plot_h + 12}" font-size="10" '
                     f'text-anchor="{anchor}">{escape(_short(texts[i], room))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 3}" font-size="10" text-anchor="middle">'
                 f"{escape(x_label)}</text>")
    for label, value in marks.items():
        parts.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{left + plot_w}" y2="{py(value):.1f}" '
                     f'stroke="#777" stroke-dasharray="4 3"><title>{escape(f"{label}: {_tick(value)}")}</title></line>')
    colours = dict(zip(lines, _colours(len(lines))))
    for name, (band_low, band_high) in band_spans.items():
        for run in _finite_runs(range(len(labels)), band_low, band_high):
            outline = [(px(positions[i]), py(band_high[i])) for i in run]
            outline += [(px(positions[i]), py(band_low[i])) for i in reversed(run)]
            parts.append(f'<polygon points="{_points(outline)}" fill="{colours[name]}" fill-opacity="0.18"/>')
    for name, ys in lines.items():
        for run in _finite_runs(range(len(labels)), ys):
            parts.append(f'<polyline points="{_points([(px(positions[i]), py(ys[i])) for i in run])}" fill="none" '
                         f'stroke="{colours[name]}" stroke-width="1.8"/>')
            for i in run:
                tip = f"{name} at {labels[i]}: {_tick(ys[i])}"
                parts.append(f'<circle cx="{px(positions[i]):.1f}" cy="{py(ys[i]):.1f}" r="2.5" '
                             f'fill="{colours[name]}"><title>{escape(tip)}</title></circle>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title or y_label)}">{"".join(parts)}</svg>')
    head = f'<div class="nm-line-title">{escape(title)}</div>' if title else ""
    y_note = f'<span class="nm-line-key">y: {escape(y_label)}</span>' if y_label else ""
    keys = "".join(f'<span class="nm-line-key"><span class="nm-line-swatch" style="background:{colours[name]}">'
                   f"</span>{escape(name)}</span>" for name in lines)
    return f'<div class="nm-line"><style>{_CSS}</style>{head}{svg}<div>{y_note}{keys}</div></div>'


def line_chart_figure(x: Sequence[Any], series: Mapping[str, Sequence[float]], *, title: str = "",
                      x_label: str = "", y_label: str = "", bands: Bands | None = None,
                      marks: Mapping[str, float] | None = None) -> Any:
    """The same chart as a plotly figure (bands as filled areas, marks as dashed lines)."""
    import plotly.graph_objects as go

    labels, _ = _x_axis(x)
    lines, band_spans, marks = _checked(series, bands or {}, marks or {}, len(labels))
    xs = list(x)
    colours = dict(zip(lines, _colours(len(lines))))
    figure = go.Figure()
    for name, (band_low, band_high) in band_spans.items():
        figure.add_trace(go.Scatter(x=xs + xs[::-1], y=list(band_high) + list(band_low)[::-1], fill="toself",
                                    fillcolor=colours[name], opacity=0.18, line={"width": 0}, hoverinfo="skip",
                                    showlegend=False))
    for name, ys in lines.items():
        figure.add_trace(go.Scatter(x=xs, y=[v if math.isfinite(v) else None for v in ys], mode="lines+markers",
                                    name=name, line={"color": colours[name]}))
    for label, value in marks.items():
        figure.add_hline(y=value, line_dash="dash", line_color="#777", annotation_text=label)
    figure.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white")
    return figure


def _x_axis(x: Sequence[Any]) -> tuple[list[str], list[float]]:
    """Each x's label and its position: the value itself when every x is a finite number, else its index."""
    values = list(x)
    if not values:
        raise ValueError("a line chart needs at least one x value")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    labels = [_tick(float(v)) if numeric else str(v) for v in values]
    return labels, [float(v) for v in values] if numeric else [float(i) for i in range(len(values))]


def _checked(series: Mapping[str, Sequence[float]], bands: Bands, marks: Mapping[str, float], n: int):
    lines = {str(name): [float(v) for v in ys] for name, ys in series.items()}
    for name, ys in lines.items():
        if len(ys) != n:
            raise ValueError(f"series {name!r} has {len(ys)} values for {n} x values")
    spans = {}
    for name, (low, high) in bands.items():
        if str(name) not in lines:
            raise ValueError(f"band {name!r} names no series; series: {', '.join(lines)}")
        low, high = [float(v) for v in low], [float(v) for v in high]
        if len(low) != n or len(high) != n:
            raise ValueError(f"band {name!r} needs {n} low and high values")
        spans[str(name)] = (low, high)
    return lines, spans, {str(label): float(value) for label, value in marks.items() if math.isfinite(value)}


def _colours(n: int) -> list[str]:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def _finite_runs(indices: range, *columns: Sequence[float]) -> list[list[int]]:
    """Maximal runs of consecutive indices where every column is finite (a gap splits the line)."""
    runs: list[list[int]] = [[]]
    for i in indices:
        if all(math.isfinite(column[i]) for column in columns):
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def _tick_indices(n: int, most: int = 12) -> list[int]:
    step = max(1, math.ceil(n / most))
    return sorted(set(range(0, n, step)) | {n - 1})


def _points(pairs: list[tuple[float, float]]) -> str:
    return " ".join(f"{a:.1f},{b:.1f}" for a, b in pairs)


def _compact(labels: list[str]) -> list[str]:
    """Tick texts: a prefix every label shares (up to a dot) dropped and hook points' `hook_` left out, so
    "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post" read "0.resid_pre", "1.resid_post" (tooltips keep the
    full labels)."""
    shared = os.path.commonprefix(labels) if len(labels) > 1 else ""
    cut = shared.rfind(".") + 1
    return [label[cut:].replace("hook_", "") or label for label in labels]


def _short(label: str, limit: int) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _tick(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
