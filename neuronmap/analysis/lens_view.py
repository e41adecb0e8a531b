"""The logit lens's views: a layer × position grid whose cells show their top token, shaded by its probability.

The HTML is a bounded static table (every token escaped, at most `MAX_ROWS` × `MAX_COLUMNS` cells, a note when cut);
the figure is a plotly heatmap with the top tokens as cell text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..display import escape, text_colour
from ..heatmap import BLUE, hex_colour, mix

if TYPE_CHECKING:
    from .lenses import LogitLens

MAX_ROWS = 96
MAX_COLUMNS = 64
TOKEN_CHARS = 12

_CSS = """
.nm-lens{font:12px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--jp-ui-font-color1,#222);margin:4px 0}
.nm-lens .nm-lens-scroll{overflow-x:auto;max-width:100%}
.nm-lens table{border-collapse:collapse;font:11px/1.2 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.nm-lens th{font-weight:400;white-space:pre;padding:1px 4px}
.nm-lens td{padding:1px 4px;white-space:pre;border:1px solid var(--jp-layout-color0,#fff);text-align:center}
.nm-lens .nm-lens-note{color:var(--jp-ui-font-color2,#555)}
"""


def lens_html(lens: LogitLens) -> str:
    """The static layer × position grid: each cell its top token, shaded white → blue by its probability; its
    title lists the top `lens.top_k` tokens with their probabilities."""
    rows, columns = lens.layers[:MAX_ROWS], list(range(min(len(lens.positions), MAX_COLUMNS)))
    head = '<th scope="col">layer ↓ · position →</th>' + "".join(
        f'<th scope="col" title="{escape(lens.tokens[c])}">{lens.positions[c]}<br>{escape(_cut(lens.tokens[c]))}</th>'
        for c in columns
    )
    body = []
    for layer in rows:
        cells = []
        for c in columns:
            top = lens.top_tokens(layer, lens.positions[c])
            token, probability = top[0]
            rgb = mix(BLUE, probability)
            hover = "\n".join(f"{text!r}: {p:.3f}" for text, p in top)
            cells.append(
                f'<td style="background:{hex_colour(rgb)};color:{text_colour(rgb)}" title="{escape(hover)}">'
                f"{escape(_cut(token))}</td>"
            )
        body.append(f'<tr><th scope="row">{escape(layer)}</th>{"".join(cells)}</tr>')
    notes = []
    if len(lens.layers) > MAX_ROWS or len(lens.positions) > MAX_COLUMNS:
        notes.append(f"showing {len(rows)} of {len(lens.layers)} layers and {len(columns)} of {len(lens.positions)} positions")
    note = f'<div class="nm-lens-note">{escape(" · ".join(notes))}</div>' if notes else ""
    return (
        f'<div class="nm-lens"><style>{_CSS}</style><div style="font-weight:600">{escape(repr(lens))}: top token per '
        f'layer × position, shaded by its probability (white 0 → blue 1)</div><div class="nm-lens-scroll">'
        f'<table aria-label="{escape(lens.method)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
        f"{note}</div>"
    )


def lens_figure(lens: LogitLens) -> Any:
    """A plotly heatmap of each cell's top-token probability, with that token as the cell's text (escaped)."""
    import plotly.graph_objects as go

    probabilities = lens.logprobs.max(-1).values.exp().numpy()
    texts = [[escape(lens.top_tokens(layer, p, 1)[0][0]) for p in lens.positions] for layer in lens.layers]
    columns = [f"{p} {escape(_cut(t))}" for p, t in zip(lens.positions, lens.tokens)]
    heatmap = go.Heatmap(
        z=probabilities, x=columns, y=[escape(layer) for layer in lens.layers], text=texts, texttemplate="%{text}",
        colorscale=[[0, "#ffffff"], [1, hex_colour(BLUE)]], zmin=0, zmax=1,
        hovertemplate="layer %{y}<br>position %{x}<br>top %{text}: %{z:.3f}<extra></extra>",
    )
    figure = go.Figure(heatmap)
    figure.update_yaxes(autorange="reversed", title_text="layer", type="category")
    figure.update_xaxes(title_text="position", type="category")
    figure.update_layout(title=f"{escape(lens.method)}: top token per layer × position")
    return figure


def _cut(text: str) -> str:
    return text if len(text) <= TOKEN_CHARS else text[: TOKEN_CHARS - 1] + "…"
