"""The layered graph's interactive view: the front end `widgets/graph.js` on a graph's nodes and edges.

Both forms draw the strongest edges first and re-filter them in the browser (a top-k slider and a threshold), pan
and zoom, tell an edge's or a node's score on hover, highlight a selected node's inputs and outputs, and open a
head node's attention pattern in the attention viewer. The live widget sends the edges as binary and a head's
patterns on demand: the first click asks the kernel, which computes them (`pattern_source`) and sends an
attention widget whose layer and heads the front end then chooses. The static form embeds the strongest
`STATIC_EDGES` edges and, within `budget`, the attention patterns of the first prompt; where scripts do not run,
the layered-graph SVG shows instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .display import Renders
from .graphview import Edge, Node, graph_html
from .heatmap import BLUE, RED
from .widget import b64, front_end, mimebundle, static_page

STATIC_EDGES = 5_000
"""Edges a static view embeds (the strongest); the live widget sends them all."""
SHOWN_EDGES = 100
"""Edges drawn when a view opens; its slider draws up to 3,000."""
ATTENTION_BUDGET = 600_000
"""Base64 characters of attention patterns a static view embeds by default."""
_PORTS = {None: 0, "q": 1, "k": 2, "v": 3}
_NO_PATTERNS = "this view has no attention patterns: view(patterns=nm.attention(model, prompts)) adds them"

PatternSource = Callable[[], Any]
"""Computes the attention patterns (`AttentionPatterns`) a head node opens, when first asked."""


class GraphView(Renders):
    """What displaying a graph-shaped result shows: the interactive view (static HTML everywhere, a live widget in a
    kernel). `parts` are `graphview.graph_html`'s arguments (nodes, edges, title, row_labels, ...)."""

    def __init__(self, parts: dict[str, Any], *, patterns: Any = None, pattern_source: PatternSource | None = None,
                 budget: int = ATTENTION_BUDGET):
        self.parts = parts
        self._patterns, self._pattern_source, self.budget = patterns, pattern_source, budget

    def patterns(self) -> Any:
        """The attention patterns head nodes open (computed on first use), or None when there are none."""
        if self._patterns is None and self._pattern_source is not None:
            self._patterns = self._pattern_source()
        return self._patterns

    def __repr__(self) -> str:
        return f"GraphView({self.parts['title']!r}, {len(self.parts['nodes'])} nodes, {len(self.parts['edges']):,} edges)"

    def _repr_html_(self) -> str:
        data = graph_data(self.parts, limit=STATIC_EDGES, digits=4)
        for key in ("edge_values", "edge_ends", "edge_ports"):
            data[key] = b64(data[key])
        heads = [node.head for node in self.parts["nodes"] if node.head is not None]
        patterns = self.patterns() if heads else None
        data["attention"] = _static_attention(patterns, heads, self.budget) if patterns is not None else None
        data["attention_error"] = "" if patterns is not None else _NO_PATTERNS
        fallback = f'<div class="nm-fallback">{graph_html(**self.parts)}</div>'
        return static_page("graph", data, fallback)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return mimebundle(self, self.widget)

    def widget(self):
        """The live view (an anywidget)."""
        return _widget_class()(self)


def graph_data(parts: dict[str, Any], limit: int | None = None, digits: int | None = None) -> dict[str, Any]:
    """The front end's fields for `parts`: nodes as dicts, the edges (strongest |value| first, at most `limit`) as
    float32 values, int32 (source, target) node indices and uint8 ports.

    `digits` rounds the values to that many significant digits, as many as the page shows: a static page stored
    in a notebook then stays the same when the last bits of a score change (another CPU, another library version).
    """
    nodes: Sequence[Node] = parts["nodes"]
    index = {node.id: i for i, node in enumerate(nodes)}
    edges: list[Edge] = sorted(
        (edge for edge in parts["edges"] if edge.source in index and edge.target in index),
        key=lambda edge: abs(edge.value), reverse=True,
    )
    kept = edges[:limit] if limit is not None else edges
    notes = [parts.get("note", "")]
    if len(kept) < len(edges):
        notes.append(f"the strongest {len(kept):,} of {len(edges):,} edges embedded (the live widget has them all)")
    colour = "#{:02x}{:02x}{:02x}".format
    return {
        "title": parts["title"],
        "description": parts.get("description", ""),
        "note": "; ".join(note for note in notes if note),
        "extra_html": parts.get("extra", ""),
        "row_labels": list(parts.get("row_labels", ())),
        "nodes": [
            {"id": n.id, "label": n.label, "row": n.row, "column": n.column, "title": n.title,
             "head": list(n.head) if n.head is not None else None}
            for n in nodes
        ],
        "edge_values": np.array([_rounded(e.value, digits) for e in kept], dtype="<f4").tobytes(),
        "edge_ends": np.array([(index[e.source], index[e.target]) for e in kept], dtype="<i4").reshape(-1, 2).tobytes(),
        "edge_ports": np.array([_PORTS[e.port] for e in kept], dtype=np.uint8).tobytes(),
        "k": min(len(kept), SHOWN_EDGES),
        "colours": {"positive": colour(*RED), "negative": colour(*BLUE)},
    }


def _rounded(value: float, digits: int | None) -> float:
    return value if digits is None else float(f"{value:.{digits}g}")


def _static_attention(patterns: Any, heads: list[tuple[int, int]], budget: int) -> dict:
    """The attention viewer's static data for the first prompt, opened on the first head's layer; as many layers as
    fit `budget` (the heads' layers first)."""
    from .attention_view import resolve_view, static_data

    layers = sorted({layer for layer, _ in heads} & set(patterns.layers))
    layer = layers[0] if layers else patterns.layers[0]
    data, _ = static_data(patterns, resolve_view(patterns, layer, [0], 0, layers=layers or None, budget=budget))
    return data


@functools.cache
def _widget_class():
    import anywidget
    import traitlets
    from ipywidgets import widget_serialization

    from .attention_view import AttentionWidget

    script, css = front_end("graph")

    class GraphWidget(anywidget.AnyWidget):
        """The live graph view: every edge as binary, a head's attention patterns on demand."""

        _esm = script
        _css = css
        title = traitlets.Unicode().tag(sync=True)
        description = traitlets.Unicode().tag(sync=True)
        note = traitlets.Unicode().tag(sync=True)
        extra_html = traitlets.Unicode().tag(sync=True)
        row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
        nodes = traitlets.List(traitlets.Dict()).tag(sync=True)
        edge_values = traitlets.Bytes().tag(sync=True)
        edge_ends = traitlets.Bytes().tag(sync=True)
        edge_ports = traitlets.Bytes().tag(sync=True)
        k = traitlets.Int().tag(sync=True)
        colours = traitlets.Dict().tag(sync=True)
        head_request = traitlets.Unicode().tag(sync=True)
        attention = traitlets.Instance(AttentionWidget, allow_none=True).tag(sync=True, **widget_serialization)
        attention_error = traitlets.Unicode().tag(sync=True)

        def __init__(self, view: GraphView):
            self._view = view
            super().__init__(**graph_data(view.parts))
            self.observe(self._on_head_request, names="head_request")

        def _on_head_request(self, change) -> None:
            if self.attention is not None or not change["new"]:
                return
            layer, head = (int(part) for part in change["new"].split("."))
            try:
                patterns = self._view.patterns()
            except Exception as error:  # shown in the view: a kernel-side traceback would be invisible there
                self.attention_error = f"could not compute the attention patterns: {error}"
                return
            if patterns is None:
                self.attention_error = _NO_PATTERNS
            elif layer not in patterns.layers:
                self.attention_error = f"the attention patterns hold layers {patterns.layers}, not {layer}"
            else:
                self.attention = AttentionWidget(patterns, layer=layer, heads=[head], prompt=0)

    return GraphWidget


def __getattr__(name: str):
    """`GraphWidget` is built on first use, so importing this module does not import anywidget."""
    if name == "GraphWidget":
        return _widget_class()
    raise AttributeError(name)
