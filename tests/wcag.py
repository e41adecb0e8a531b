"""WCAG 2 contrast, written out from the definitions for the tests (the independent reference for the views).

Relative luminance and contrast ratio: https://www.w3.org/TR/WCAG21/#dfn-relative-luminance and
#dfn-contrast-ratio. Colours come as CSS text: `#rgb`, `#rrggbb`, `rgb(r, g, b)` or `rgba(r, g, b, a)`.
"""

from __future__ import annotations

import re

AA = 4.5
"""The contrast ratio WCAG 2 level AA asks of normal-size text."""


def rgba(css: str) -> tuple[float, float, float, float]:
    """A CSS colour as 0-255 channels and an alpha from 0 to 1."""
    css = css.strip()
    if css.startswith("#"):
        digits = css[1:]
        if len(digits) == 3:
            digits = "".join(d * 2 for d in digits)
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16), 1.0
    match = re.fullmatch(r"rgba?\((.*)\)", css)
    if not match:
        raise ValueError(f"not a colour this helper reads: {css!r}")
    parts = [float(part) for part in re.split(r"[\s,/]+", match.group(1).strip())]
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else 1.0


def over(top: str, bottom: tuple[float, float, float]) -> tuple[float, float, float]:
    """The opaque colour `top` (CSS, maybe translucent) shows as when painted over the opaque `bottom`."""
    r, g, b, a = rgba(top)
    return tuple(a * c + (1 - a) * d for c, d in zip((r, g, b), bottom))


def luminance(rgb: tuple[float, float, float]) -> float:
    def linear(channel: float) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(first: tuple[float, float, float], second: tuple[float, float, float]) -> float:
    """(L1 + 0.05) / (L2 + 0.05), the lighter colour's luminance on top: from 1 to 21."""
    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)
