"""The rendering contract's shared parts: escaping, byte sizes, readable text colours, a bounded self-contained table,
`save_html`, JSON for inline scripts.

Every result type renders through these, so escaping and size bounds are implemented once.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any

MAX_TABLE_ROWS = 200

_TABLE_CSS = """
.nm-table{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#222;margin:4px 0}
.nm-table .nm-caption{font-weight:600;margin-bottom:4px}
.nm-table table{border-collapse:collapse}
.nm-table th,.nm-table td{padding:2px 10px;border-bottom:1px solid #e3e3e3;text-align:left}
.nm-table td.nm-num{text-align:right}
.nm-table .nm-note{color:#777;margin-top:4px}
"""


def escape(value: Any) -> str:
    """Text made safe for HTML content and attribute values (tokens may hold `<script>` or quotes)."""
    return html.escape(str(value), quote=True)


def script_json(data: Any) -> str:
    """`data` as JSON safe inside `<script type="application/json">`: it cannot close the tag or open a comment, and
    has no "/" at all, so base64 data never spells a path such as "/tmp" in a saved notebook."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("/", "\\u002f")


def text_colour(rgb: Sequence[float]) -> str:
    """Black or white, whichever has the larger WCAG contrast ratio with the 0-255 sRGB colour `rgb`.

    The better of the two always reaches 4.58:1, so text on any data colour stays readable (WCAG AA asks 4.5:1).
    """
    lightness = relative_luminance(rgb)
    return "#000" if (lightness + 0.05) / 0.05 >= 1.05 / (lightness + 0.05) else "#fff"


def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG 2's relative luminance of a 0-255 sRGB colour: 0 for black, 1 for white."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (channel / 255 for channel in rgb)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def format_bytes(n: int) -> str:
    """A byte count in the largest unit that keeps it at or above 1 (1024-based)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def html_table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A self-contained HTML table (styles scoped under `.nm-table`), cut at `MAX_TABLE_ROWS` with a note."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows[:MAX_TABLE_ROWS]:
        cells = "".join(
            f'<td class="nm-num">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    note = ""
    if len(rows) > MAX_TABLE_ROWS:
        note = f'<div class="nm-note">showing {MAX_TABLE_ROWS} of {len(rows)} rows</div>'
    return (
        f'<div class="nm-table"><style>{_TABLE_CSS}</style><div class="nm-caption">{escape(caption)}</div>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</div>"
    )


class Renders:
    """Mixin for result types: `save_html`, JSON for inline scripts.writes the object's static view as a standalone page."""

    def _repr_html_(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def save_html(self, path: str | os.PathLike) -> None:
        """Write the static HTML view to `path` as a complete page that needs no network."""
        page = (
            '<!doctype html><html><head><meta charset="utf-8">'
            f"<title>{escape(repr(self))}</title></head><body>{self._repr_html_()}</body></html>"
        )
        tmp = f"{os.fspath(path)}.partial"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, path)
