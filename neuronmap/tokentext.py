"""Token text with a value on each token, as shaded, escaped HTML: the view of a context window, a prompt's
attributions, or anything else that scores tokens.

Each token keeps its own spacing (a line break or tab shows as ↵ or ⇥), its background is the colour's share of the
value against the scale, its text black or white by WCAG contrast, and its title tells the exact value. One token
can be marked (outlined and bold). Every style is inline, so the view keeps its look where `<style>` is dropped
(GitHub, untrusted notebook outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .display import Renders, escape, text_colour
from .heatmap import BLUE, hex_colour, mix

ORANGE = (230, 85, 13)
"""The default shade (ColorBrewer Oranges): white for 0, this for the top of the scale."""
MAX_TOKENS = 2000
"""Tokens one view draws at most; the rest are summarised in a note."""


def shade(value: float, scale: float, colour: Sequence[int] = ORANGE) -> tuple[int, int, int]:
    """The 0-255 sRGB background of `value` on a scale whose top is `scale`: white at 0, `colour` at `scale` and
    beyond (negative values blue when `colour` is the default, by their magnitude). NaN and a zero scale are white."""
    if not scale or not math.isfinite(scale) or math.isnan(value):
        return (255, 255, 255)
    depth = min(1.0, abs(value) / abs(scale))
    end = BLUE if value < 0 and tuple(colour) == ORANGE else tuple(colour)
    return mix(end, depth)


def shown(token: str) -> str:
    """A token as drawn: line breaks and tabs as visible marks (its spaces stay spaces)."""
    return token.replace("\r\n", "\u21b5").replace("\n", "\u21b5").replace("\r", "\u21b5").replace("\t", "\u21e5")


def token_text_html(
    tokens: Sequence[str],
    values: Sequence[float] | None = None,
    *,
    scale: float | None = None,
    marked: int | None = None,
    colour: Sequence[int] = ORANGE,
    titles: Sequence[str] | None = None,
    value_format: str = ".3g",
) -> str:
    """Tokens as one line of inline spans, each shaded by its value (`scale` defaults to the largest |value|).

    `marked` outlines one token; `titles` replace each token's hover text (default: its text and value).
    Tokens past `MAX_TOKENS` are left out with a note.
    """
    if values is not None and len(values) != len(tokens):
        raise ValueError(f"{len(values)} values for {len(tokens)} tokens")
    if titles is not None and len(titles) != len(tokens):
        raise ValueError(f"{len(titles)} titles for {len(tokens)} tokens")
    finite = [abs(v) for v in (values or ()) if not math.isnan(v)]
    top = scale if scale is not None else (max(finite) if finite else 0.0)
    spans = []
    for i, token in enumerate(tokens[:MAX_TOKENS]):
        value = values[i] if values is not None else math.nan
        rgb = shade(value, top, colour)
        style = f"background:{hex_colour(rgb)};color:{text_colour(rgb)};white-space:pre;padding:0 1px"
        if i == marked:
            style += ";outline:2px solid currentColor;outline-offset:-1px;font-weight:700"
        if titles is not None:
            title = titles[i]
        else:
            title = repr(token) if math.isnan(value) else f"{token!r}: {format(value, value_format)}"
        spans.append(f'<span style="{style}" title="{escape(title)}">{escape(shown(token))}</span>')
    more = ""
    if len(tokens) > MAX_TOKENS:
        more = f'<span style="color:#666"> … {len(tokens) - MAX_TOKENS} more tokens</span>'
    return (
        '<span class="nm-tokentext" style="font:12px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace">'
        f"{''.join(spans)}{more}</span>"
    )


class TokenText(Renders):
    """Tokens with a value on each, shown as shaded text (see `token_text_html`)."""

    def __init__(self, tokens: Sequence[str], values: Sequence[float] | None = None, *, scale: float | None = None,
                 marked: int | None = None, title: str | None = None):
        self.tokens, self.values = list(tokens), None if values is None else [float(v) for v in values]
        self.scale, self.marked, self.title = scale, marked, title
        token_text_html(self.tokens, self.values)  # checks the lengths now, not when displayed

    def __repr__(self) -> str:
        name = f"{self.title!r}, " if self.title else ""
        return f"TokenText({name}{len(self.tokens)} tokens)"

    def _repr_html_(self) -> str:
        title = f'<div style="font-weight:600;margin-bottom:2px">{escape(self.title)}</div>' if self.title else ""
        body = token_text_html(self.tokens, self.values, scale=self.scale, marked=self.marked)
        return f'<div class="nm-tokentext-view" style="margin:4px 0">{title}{body}</div>'
