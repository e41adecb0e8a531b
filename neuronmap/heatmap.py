"""The heatmap every grid-shaped result renders as: bounded static HTML and a plotly figure.

Head scores (layer × head) and patching sweeps (layer × position, layer × head, layer × head × position) share it,
so the colour scales, text contrast, escaping and size bound are decided once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .display import escape, text_colour
from .errors import InputError

if TYPE_CHECKING:
    import plotly.graph_objects as go

MAX_HTML_BYTES = 1_500_000
"""The most UTF-8 bytes `heatmap_html` returns, whatever the grid's size and labels: it draws fewer cells to fit."""
MAX_CELLS = 8192
"""Cells drawn by default (all panels together); a larger grid is shown as blocks, each its largest-magnitude value."""
MAX_PANELS = 64
"""Panels (small multiples) drawn at most; the note says how many were left out."""
LABEL_CHARS = 32
"""Labels are cut to this many characters (ending in …) in headers and panel captions."""
HOVER_CHARS = 120
"""Labels are cut to this many characters in hover text."""
VALUE_COLUMNS = 32
"""Up to this many columns (and no blocks), each cell also prints its rounded value."""

BLUE, WHITE, RED = (33, 102, 172), (255, 255, 255), (178, 24, 43)
"""The scales' ends (ColorBrewer RdBu): white → blue for scores, blue → white (0) → red for signed values."""

_TEXT_CHARS = 2000
_CSS = """
.nm-heatmap{font:12px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--jp-ui-font-color1,#222);max-width:100%;box-sizing:border-box;margin:4px 0}
.nm-heatmap .nm-hm-desc,.nm-heatmap .nm-hm-note,.nm-heatmap .nm-hm-corner{color:var(--jp-ui-font-color2,#555)}
.nm-heatmap .nm-hm-panels{display:flex;flex-wrap:wrap;gap:8px 20px;margin:6px 0 4px}
.nm-heatmap .nm-hm-panel{min-width:0;max-width:100%}
.nm-heatmap .nm-hm-caption{font-weight:600;margin-bottom:2px}
.nm-heatmap .nm-hm-scroll{overflow-x:auto;max-width:100%}
.nm-heatmap table{border-collapse:collapse;font:11px/1.2 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.nm-heatmap th{font-weight:400;white-space:pre;padding:1px 3px;text-align:center;vertical-align:bottom}
.nm-heatmap tbody th{text-align:right;vertical-align:middle;position:sticky;left:0;z-index:1;background:var(--jp-layout-color0,#fff)}
.nm-heatmap th.nm-hm-corner{text-align:right;font-style:italic;padding-right:6px;position:sticky;left:0;z-index:1;background:var(--jp-layout-color0,#fff)}
.nm-heatmap td{min-width:2.9em;height:1.8em;padding:0 3px;text-align:center;white-space:nowrap;border:1px solid var(--jp-layout-color0,#fff)}
.nm-heatmap .nm-hm-compact td{min-width:0;width:10px;height:12px;padding:0;border:0}
.nm-heatmap .nm-hm-vertical thead th:not(.nm-hm-corner) span{writing-mode:vertical-rl;transform:rotate(180deg)}
.nm-heatmap .nm-hm-nan{background:repeating-linear-gradient(45deg,#fff 0 3px,#bbb 3px 4px)}
"""


def heatmap_html(
    values: Any,
    rows: Sequence[Any],
    columns: Sequence[Any],
    *,
    title: str,
    row_title: str,
    column_title: str,
    diverging: bool,
    panels: Sequence[Any] | None = None,
    description: str | None = None,
    value_format: str = ".2f",
    note: str | None = None,
    max_cells: int = MAX_CELLS,
) -> str:
    """Self-contained HTML of `values` `[row, column]` (or `[panel, row, column]` with `panels` labels, as small
    multiples on one colour scale), under `MAX_HTML_BYTES`.

    `diverging` colours signed values blue (negative) / white (0) / red (positive), symmetric in the largest |value|;
    otherwise white (lowest) to blue (highest). NaN cells stay blank. Every cell's title gives its row, column and
    exact value; small grids also print it, rounded by `value_format` (a format spec). More than `max_cells` cells
    are shown as blocks of rows or columns, each its largest-magnitude value, and the note says so.
    """
    grid, rows, columns, panel_labels = _checked(values, rows, columns, panels)
    low, high = _scale(grid, diverging)
    notes = [_cut(note, _TEXT_CHARS)] if note else []
    if grid.shape[0] > MAX_PANELS:
        notes.append(f"showing the first {MAX_PANELS} of {grid.shape[0]} panels")
        grid, panel_labels = grid[:MAX_PANELS], panel_labels[:MAX_PANELS]
    texts = {
        "title": _cut(title, _TEXT_CHARS), "description": _cut(description or "", _TEXT_CHARS),
        "row_title": _cut(row_title, LABEL_CHARS), "column_title": _cut(column_title, LABEL_CHARS),
    }
    budget = max(1, max_cells)
    while True:
        page = _render(grid, rows, columns, panel_labels, (low, high), diverging, value_format, notes, texts, budget)
        size = len(page.encode("utf-8"))
        if size <= MAX_HTML_BYTES or budget == 1:
            return page
        budget = max(1, min(budget - 1, int(budget * MAX_HTML_BYTES / size * 0.95)))  # long labels: fewer cells


def heatmap_figure(
    values: Any,
    rows: Sequence[Any],
    columns: Sequence[Any],
    *,
    title: str,
    row_title: str,
    column_title: str,
    diverging: bool,
    panels: Sequence[Any] | None = None,
    shared_scale: bool = True,
) -> go.Figure:
    """The same heatmap as a plotly figure (one subplot per panel, one shared colour axis centred at 0 when
    `diverging`), every value kept. With `shared_scale=False` each panel gets its own colour axis and bar beside it,
    for panels of different quantities. plotly is an optional dependency, so it is imported here."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    grid, rows, columns, panel_labels = _checked(values, rows, columns, panels)
    n_panels, n_rows, n_cols = grid.shape
    titles = [escape(label) for label in panel_labels] if panels is not None else None
    figure = make_subplots(n_panels, 1, subplot_titles=titles, shared_xaxes=True, vertical_spacing=0.3 / n_panels)
    shown_rows = [escape(_shown(label)) for label in rows]
    shown_columns = [escape(_shown(label)) for label in columns]
    labels = np.empty((n_rows, n_cols, 2), dtype=object)
    labels[..., 0] = np.array(shown_rows, dtype=object)[:, None]
    labels[..., 1] = np.array(shown_columns, dtype=object)[None, :]
    hover = f"{escape(row_title)} %{{customdata[0]}}<br>{escape(column_title)} %{{customdata[1]}}<br>%{{z}}"
    hover += "<extra></extra>"  # no trace name beside the box
    axes = ["coloraxis"] * n_panels if shared_scale else [f"coloraxis{i + 1 if i else ''}" for i in range(n_panels)]
    for index, panel in enumerate(grid):
        heatmap = go.Heatmap(z=panel.astype(np.float64), customdata=labels, coloraxis=axes[index], hovertemplate=hover)
        figure.add_trace(heatmap, row=index + 1, col=1)
    figure.update_yaxes(autorange="reversed", title_text=escape(row_title), **_ticks(shown_rows))
    figure.update_xaxes(**_ticks(shown_columns))
    figure.update_xaxes(title_text=escape(column_title), row=n_panels, col=1)
    stops = [[0, hex_colour(BLUE)], [0.5, hex_colour(WHITE)], [1, hex_colour(RED)]] if diverging else [[0, hex_colour(WHITE)], [1, hex_colour(BLUE)]]
    scale = {"colorscale": stops, **({"cmid": 0} if diverging else {})}
    for index, axis in enumerate(dict.fromkeys(axes)):
        if not shared_scale:  # the bar beside its own panel
            low, high = figure.layout[f"yaxis{index + 1 if index else ''}"].domain
            scale = {**scale, "colorbar": {"y": (low + high) / 2, "len": high - low, "yanchor": "middle", "thickness": 14}}
        figure.layout[axis] = scale
    figure.update_layout(
        title=escape(title),
        width=min(1100, 220 + 36 * n_cols),
        height=140 + n_panels * (40 + min(600, 28 * n_rows)),
    )
    return figure


def _colour(value: float, low: float, high: float, diverging: bool) -> tuple[int, int, int]:
    """The opaque 0-255 sRGB colour of a finite or infinite `value` on the scale from `low` to `high`."""
    if diverging:
        depth = max(-1.0, min(1.0, value / high)) if high > 0 else 0.0
        return mix(RED if depth > 0 else BLUE, abs(depth))
    return mix(BLUE, max(0.0, min(1.0, (value - low) / (high - low))) if high > low else 0.0)


def _render(grid, rows, columns, panel_labels, scale, diverging, value_format, notes, texts, budget) -> str:
    """The whole view, drawing at most `budget` cells (blocks of rows or columns beyond that)."""
    n_panels, n_rows, n_cols = grid.shape
    row_block, column_block = _block_sizes(n_rows, n_cols, max(1, budget // n_panels))
    row_axis = _axis(rows, row_block, texts["row_title"])
    column_axis = _axis(columns, column_block, texts["column_title"])
    blocked = row_block > 1 or column_block > 1
    show_values = not blocked and n_cols <= VALUE_COLUMNS
    vertical = not show_values or any(len(_shown(label)) > 4 for label in columns)
    classes = " ".join(["nm-hm-grid"] + ["nm-hm-compact"] * (not show_values) + ["nm-hm-vertical"] * vertical)
    head = f'<th class="nm-hm-corner">{escape(texts["column_title"])} →<br>{escape(texts["row_title"])} ↓</th>'
    head += "".join(f'<th title="{escape(hover)}"><span>{escape(text)}</span></th>' for text, hover in column_axis)
    cell = functools.partial(_cell, scale=scale, diverging=diverging, value_format=value_format, show=show_values)
    value_name = "largest |value| in block" if blocked else "value"
    ends = [f"{hover}\n{value_name}: " for _, hover in column_axis]  # each cell's hover: row, column, value
    shown = [_reduce(panel, row_block, column_block) for panel in grid]
    tables = []
    for label, panel in zip(panel_labels, shown):
        body = "".join(
            f'<tr><th scope="row" title="{escape(row_hover)}">{escape(row_text)}</th>'
            + "".join(cell(value, f"{row_hover}\n{end}{value!s}") for end, value in zip(ends, row))
            + "</tr>"
            for (row_text, row_hover), row in zip(row_axis, panel)
        )
        caption = f'<div class="nm-hm-caption">{escape(_cut(label, LABEL_CHARS))}</div>' if label is not None else ""
        name = texts["title"] if label is None else f"{texts['title']} {label}"
        tables.append(
            f'<div class="nm-hm-panel">{caption}<div class="nm-hm-scroll">'
            f'<table class="{classes}" aria-label="{escape(name)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            "</div></div>"
        )
    if blocked:
        block = f"{_count(row_block, 'row')} × {_count(column_block, 'column')}"
        notes = notes + [
            f"{n_rows} × {n_cols} values shown as {len(row_axis)} × {len(column_axis)} cells, each the value of "
            f"largest magnitude in a block of {block} (hover a cell for its range)"
        ]
    description = f'<div class="nm-hm-desc">{escape(texts["description"])}</div>' if texts["description"] else ""
    note = f'<div class="nm-hm-note">{escape(" · ".join(notes))}</div>' if notes else ""
    legend = _legend(*scale, diverging, any(np.isnan(panel).any() for panel in shown))
    return (
        f'<div class="nm-heatmap"><style>{_CSS}</style>'
        f'<div class="nm-hm-title" style="font-weight:600">{escape(texts["title"])}</div>{description}'
        f'<div class="nm-hm-panels">{"".join(tables)}</div>{legend}{note}</div>'
    )


def _cell(
    value: np.floating, hover: str, *, scale: tuple[float, float], diverging: bool, value_format: str, show: bool
) -> str:
    """One `<td>`: opaque colour, black or white text by WCAG contrast, the exact value in its title."""
    if math.isnan(value):
        return f'<td class="nm-hm-nan" title="{escape(hover)}"></td>'
    rgb = _colour(float(value), *scale, diverging)
    text = escape(_rounded(value, value_format)) if show else ""
    return f'<td style="background:{hex_colour(rgb)};color:{text_colour(rgb)}" title="{escape(hover)}">{text}</td>'


def _legend(low: float, high: float, diverging: bool, has_nan: bool) -> str:
    """The colour bar with the values at its ends (and 0 in its middle when diverging), styled inline so that it
    keeps its shape where `<style>` is dropped (JupyterLab's untrusted outputs, GitHub)."""
    stops = ",".join(hex_colour(c) for c in ((BLUE, WHITE, RED) if diverging else (WHITE, BLUE)))
    ticks = (_tick(low), "0" if diverging else "", _tick(high))
    sides = ("left", "center", "right")
    spans = "".join(f'<span style="text-align:{side}">{escape(tick)}</span>' for tick, side in zip(ticks, sides))
    swatch = '<span class="nm-hm-nan" style="display:inline-block;width:12px;height:12px;vertical-align:middle"></span>'
    blank = f"<span>{swatch} no value</span>" if has_nan else ""
    return (
        '<div class="nm-hm-legend" style="display:flex;align-items:center;gap:4px 12px;flex-wrap:wrap;margin-top:2px">'
        '<div style="width:200px"><div class="nm-hm-bar" style="height:10px;border:1px solid var(--jp-border-color1,#999);'
        f'background:linear-gradient(to right,{stops})"></div><div class="nm-hm-ticks" style="display:grid;'
        f'grid-template-columns:1fr 1fr 1fr;font:11px ui-monospace,Menlo,Consolas,monospace">{spans}</div></div>'
        f"{blank}</div>"
    )


def _checked(values: Any, rows: Sequence[Any], columns: Sequence[Any], panels: Sequence[Any] | None):
    """`values` as a float array `[panel, row, column]`, the labels as strings (panel labels None for a 2-D grid)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values if values.dtype in (torch.float16, torch.float32, torch.float64) else values.double()
    grid = np.asarray(values)
    shape = tuple(grid.shape)
    if not np.issubdtype(grid.dtype, np.floating):
        grid = grid.astype(np.float64)
    if grid.ndim == 2 and panels is None:
        grid, panel_labels = grid[None], [None]
    elif grid.ndim == 3 and panels is not None and len(panels) == grid.shape[0]:
        panel_labels = [str(label) for label in panels]
    else:
        given = "no panels" if panels is None else f"{len(panels)} panel labels"
        raise InputError(
            f"a heatmap takes values [row, column], or [panel, row, column] with one label per panel; "
            f"got shape {shape} and {given}"
        )
    if 0 in grid.shape:
        raise InputError(f"a heatmap needs at least one value; got shape {shape}")
    for what, labels, count in (("rows", rows, grid.shape[1]), ("columns", columns, grid.shape[2])):
        if len(labels) != count:
            raise InputError(f"{len(labels)} labels for the {count} {what} of values")
    return grid, [str(label) for label in rows], [str(label) for label in columns], panel_labels


def _scale(grid: np.ndarray, diverging: bool) -> tuple[float, float]:
    """The values at the scale's ends: ±max |value| when diverging, else the lowest and highest (finite) values."""
    finite = grid[np.isfinite(grid)].astype(np.float64)
    if finite.size == 0:
        return 0.0, 0.0
    if diverging:
        largest = float(np.abs(finite).max())
        return -largest, largest
    return float(finite.min()), float(finite.max())


def _block_sizes(n_rows: int, n_cols: int, budget: int) -> tuple[int, int]:
    """Rows and columns per cell so that at most `budget` cells show: columns are merged first, rows only when even
    64 columns (or all of them) would not fit beside every row."""
    rows_shown = min(n_rows, max(1, budget // min(n_cols, 64)))
    row_block = -(-n_rows // rows_shown)
    rows_shown = -(-n_rows // row_block)
    return row_block, -(-n_cols // max(1, budget // rows_shown))


def _reduce(panel: np.ndarray, row_block: int, column_block: int) -> np.ndarray:
    """Each `row_block × column_block` block's value of largest magnitude (NaN only where the whole block is NaN)."""
    if row_block == column_block == 1:
        return panel
    n_rows, n_cols = panel.shape
    shown_rows, shown_cols = -(-n_rows // row_block), -(-n_cols // column_block)
    padded = np.full((shown_rows * row_block, shown_cols * column_block), np.nan, dtype=panel.dtype)
    padded[:n_rows, :n_cols] = panel
    blocks = padded.reshape(shown_rows, row_block, shown_cols, column_block).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(shown_rows, shown_cols, row_block * column_block)
    magnitude = np.where(np.isnan(blocks), -1.0, np.abs(blocks.astype(np.float64)))
    return np.take_along_axis(blocks, magnitude.argmax(-1)[..., None], -1)[..., 0]


def _axis(labels: list[str], block: int, title: str) -> list[tuple[str, str]]:
    """(header text, hover text) for each shown row or column; a block is named by its index range."""
    if block == 1:
        return [(_shown(label), f"{title}: {_shown(label, HOVER_CHARS)}") for label in labels]
    spans = [(start, min(start + block, len(labels)) - 1) for start in range(0, len(labels), block)]
    ends = [(a, b, _shown(labels[a], HOVER_CHARS), _shown(labels[b], HOVER_CHARS)) for a, b in spans]
    return [(f"{a}–{b}", f"{title} {a}–{b}: {first} … {last}") for a, b, first, last in ends]


def _shown(label: str, limit: int = LABEL_CHARS) -> str:
    """A label as shown: line breaks and tabs as ↵ and ⇥, leading and trailing spaces as ␣, cut to `limit`."""
    text = label.replace("\r\n", "\u21b5").replace("\n", "\u21b5").replace("\r", "\u21b5").replace("\t", "\u21e5")
    core = text.strip(" ")
    lead = len(text) - len(text.lstrip(" "))
    return _cut("\u2423" * lead + core + "\u2423" * (len(text) - lead - len(core)), limit)


def _ticks(labels: list[str]) -> dict[str, list]:
    """Plotly tick positions and texts: every label up to 40, else every k-th (duplicate tokens stay apart)."""
    step = -(-len(labels) // 40)
    return {"tickmode": "array", "tickvals": list(range(0, len(labels), step)), "ticktext": labels[::step]}


def _rounded(value: np.floating, spec: str) -> str:
    """`value` formatted by `spec`, without the minus sign of a value that rounds to zero."""
    text = format(value, spec)
    if text.startswith("-") and math.isfinite(value) and not any(digit in text for digit in "123456789"):
        return text[1:]
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _tick(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def mix(end: tuple[int, int, int], depth: float) -> tuple[int, int, int]:
    """White blended towards `end` by `depth` (0-1), each sRGB channel linearly."""
    return tuple(round(255 - depth * (255 - channel)) for channel in end)


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """A 0-255 sRGB colour as CSS `#rrggbb`."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)
