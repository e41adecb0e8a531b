"""The layered graph every graph-shaped result renders as: a self-contained, bounded SVG.

Nodes sit in rows (the first row at the bottom) and edges run upwards between them, drawn as curves whose width
grows with |value| and whose colour gives the sign (red positive, blue negative, as in the heatmap). An edge may
end at a named port of its target (a head's q, k or v input), drawn at its own place on the node and with its own
dash pattern. Every node and edge has a hover title; all text is escaped. At most `max_edges` edges are drawn (the
largest |value| first) and the note says how many were left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .display import escape
from .heatmap import BLUE, RED, hex_colour

MAX_EDGES = 400
"""Edges drawn by default: the strongest; the note says how many more there are."""
PORTS = {"q": (-0.3, "none"), "k": (0.0, "5 3"), "v": (0.3, "1.5 2.5")}
"""Where on a node's lower edge each input port sits (a fraction of its width from the centre), and its dashes."""

_NODE_WIDTH, _NODE_HEIGHT, _COLUMN, _ROW, _MARGIN, _LABEL_WIDTH = 46, 20, 58, 64, 14, 64
_CSS = """
.nm-graph{font:12px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--jp-ui-font-color1,#222);max-width:100%;margin:4px 0}
.nm-graph .nm-graph-title{font-weight:600}
.nm-graph .nm-graph-desc,.nm-graph .nm-graph-note{color:var(--jp-ui-font-color2,#555)}
.nm-graph .nm-graph-scroll{overflow:auto;max-width:100%;max-height:80vh}
.nm-graph svg text{font:11px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;fill:#222}
.nm-graph svg .nm-graph-row{fill:#777;font-style:italic}
.nm-graph svg rect{fill:#f4f4f4;stroke:#888}
.nm-graph svg path{fill:none}
"""


@dataclass(frozen=True)
class Node:
    """A node of the view: `id` (what edges name), the `label` printed on it, its `row` and its `column`; `head`, the
    (layer, head) whose attention pattern the interactive view opens when the node is clicked."""

    id: str
    label: str
    row: int
    column: float
    title: str = ""
    head: tuple[int, int] | None = None


@dataclass(frozen=True)
class Edge:
    """An edge of the view from node `source` to node `target` (at `port`, if any), of signed `value`."""

    source: str
    target: str
    value: float
    port: str | None = None
    title: str = ""


def graph_html(
    nodes: Sequence[Node],
    edges: Sequence[Edge],
    *,
    title: str,
    row_labels: Sequence[str] = (),
    description: str = "",
    note: str = "",
    extra: str = "",
    max_edges: int = MAX_EDGES,
) -> str:
    """Self-contained HTML: a title, an SVG of the layered graph (rows labelled by `row_labels`, bottom up), a legend,
    a note, and `extra` HTML (already escaped, e.g. a small chart) below."""
    drawn = sorted(edges, key=lambda e: abs(e.value), reverse=True)[:max_edges]
    notes = [note] if note else []
    if len(edges) > len(drawn):
        notes.append(f"showing the {len(drawn):,} strongest of {len(edges):,} edges")
    n_rows = 1 + max((node.row for node in nodes), default=0)
    n_columns = 1 + max((node.column for node in nodes), default=0)
    width = round(_LABEL_WIDTH + n_columns * _COLUMN + 2 * _MARGIN)
    height = n_rows * _ROW + 2 * _MARGIN
    places = {node.id: _place(node, n_rows) for node in nodes}
    largest = max((abs(e.value) for e in drawn), default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{escape(title)}">']
    for row, label in enumerate(row_labels[:n_rows]):
        y = _MARGIN + (n_rows - 1 - row) * _ROW + _ROW / 2
        parts.append(f'<text class="nm-graph-row" x="4" y="{y + 4:.0f}">{escape(label)}</text>')
    for edge in reversed(drawn):  # strongest drawn last, on top
        if edge.source in places and edge.target in places:
            parts.append(_edge(edge, places, largest))
    for node in nodes:
        x, y = places[node.id]
        hover = escape(node.title or node.label)
        parts.append(
            f'<g><title>{hover}</title><rect x="{x - _NODE_WIDTH / 2:.1f}" y="{y - _NODE_HEIGHT / 2:.1f}" width="{_NODE_WIDTH}" '
            f'height="{_NODE_HEIGHT}" rx="4"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{escape(node.label)}</text></g>'
        )
    parts.append("</svg>")
    return (
        f'<div class="nm-graph"><style>{_CSS}</style><div class="nm-graph-title">{escape(title)}</div>'
        + (f'<div class="nm-graph-desc">{escape(description)}</div>' if description else "")
        + f'<div class="nm-graph-scroll">{"".join(parts)}</div>{_legend(largest, any(e.port for e in drawn))}'
        + "".join(f'<div class="nm-graph-note">{escape(n)}</div>' for n in notes)
        + f"{extra}</div>"
    )


def _place(node: Node, n_rows: int) -> tuple[float, float]:
    x = _MARGIN + _LABEL_WIDTH + node.column * _COLUMN + _COLUMN / 2
    y = _MARGIN + (n_rows - 1 - node.row) * _ROW + _ROW / 2
    return x, y


def _edge(edge: Edge, places: dict[str, tuple[float, float]], largest: float) -> str:
    (x1, y1), (x2, y2) = places[edge.source], places[edge.target]
    offset, dashes = PORTS.get(edge.port or "", (0.0, "none"))
    y1 -= _NODE_HEIGHT / 2
    x2, y2 = x2 + offset * _NODE_WIDTH, y2 + _NODE_HEIGHT / 2
    bend = max(abs(y2 - y1) / 2, 12)
    strength = abs(edge.value) / largest
    colour = hex_colour(RED if edge.value >= 0 else BLUE)
    hover = escape(edge.title or f"{edge.source} → {edge.target}: {edge.value:+.4g}")
    return (
        f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 - bend:.1f} {x2:.1f},{y2 + bend:.1f} {x2:.1f},{y2:.1f}" '
        f'stroke="{colour}" stroke-width="{0.6 + 5.4 * strength:.2f}" stroke-opacity="{0.25 + 0.7 * strength:.2f}" '
        f'stroke-dasharray="{dashes}"><title>{hover}</title></path>'
    )


def _legend(largest: float, ports: bool) -> str:
    red, blue = hex_colour(RED), hex_colour(BLUE)
    items = [
        f'<span style="color:{red}">━</span> positive',
        f'<span style="color:{blue}">━</span> negative',
        f"width ∝ |value| (thickest {largest:.3g})",
    ]
    if ports:
        items.append("into a head's query ━ (left), key ╍ (middle), value ┈ (right)")
    return f'<div class="nm-graph-note">{" · ".join(items)}</div>'
