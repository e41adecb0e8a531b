"""The live half of the rendering contract: front ends shipped in `neuronmap/widgets/`, and when to show them.

A result's mime bundle always holds its static HTML; the anywidget view is added only when an interactive
front end executes the cell. Headless runners (papermill, `nbconvert --execute`, nbclient) would otherwise
store widget state that an exported page can only show by loading the widget manager from a CDN, which
offline shows nothing; their outputs keep the static view instead.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

WIDGETS_DIR = Path(__file__).resolve().parent / "widgets"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
FORCE_ENV = "NEURONMAP_WIDGETS"
"""Set to 1 or 0 to always or never add the live widget to results' mime bundles."""


def front_end(name: str) -> tuple[str, str]:
    """The ES module and CSS of one shipped front end, e.g. `front_end("attention")`, with the front ends it uses.

    A front end that opens another's view inside its own (the graph view shows a head's attention pattern in the
    attention viewer) names it in `USES`; that module comes first, in a scope of its own, as `<name>View` with its
    `render` and `staticModel`.
    """
    scripts, styles = [], []
    for used in USES.get(name, ()):
        script, css = _files(used)
        scripts.append(
            f"const {used}View = (() => {{\n{_module_body(script, used)}\nreturn {{ render, staticModel }};\n}})();"
        )
        styles.append(css)
    script, css = _files(name)
    return "\n".join([*scripts, script]), "\n".join([*styles, css])


USES = {"graph": ("attention",)}
"""The front ends each front end bundles in front of itself."""


def _files(name: str) -> tuple[str, str]:
    return (WIDGETS_DIR / f"{name}.js").read_text(encoding="utf-8"), (WIDGETS_DIR / f"{name}.css").read_text(encoding="utf-8")


def _module_body(script: str, name: str) -> str:
    """The module without its closing `export default { render };`, which every front end ends with."""
    body = script.replace(_EXPORT, "")
    if body == script:
        raise AssertionError(f"widgets/{name}.js must end its module with {_EXPORT!r}")
    return body


def interactive_front_end() -> bool:
    """Whether the code runs in a kernel whose front end is interactive (and so can show widgets).

    Interactive front ends (JupyterLab, Notebook 7, VS Code, Colab) send execute requests that allow stdin;
    headless runners do not. `NEURONMAP_WIDGETS=1|0` overrides the guess.
    """
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


def mimebundle(result: Any, make_widget: Callable[[], Any]) -> dict[str, Any]:
    """`result`'s static HTML and text, plus its widget view when a live front end can show it."""
    bundle: dict[str, Any] = {"text/plain": repr(result), "text/html": result._repr_html_()}
    if interactive_front_end():
        view = make_widget()._repr_mimebundle_()
        if isinstance(view, tuple):
            view = view[0]
        if WIDGET_VIEW in view:
            bundle[WIDGET_VIEW] = view[WIDGET_VIEW]
    return bundle


def static_page(name: str, data: dict[str, Any], fallback_html: str) -> str:
    """A self-contained view: the front end's CSS and ES module inline, `data` as JSON, rendered in place.

    The same module renders the live widget; here it gets a stand-in model backed by `data`. Until the script
    runs (or where scripts do not run, as on GitHub) `fallback_html` shows.
    """
    script, css = front_end(name)
    payload = json.dumps(data, separators=(",", ":"))
    # JSON inside <script> must not be able to close the tag or open a comment; no "/" at all keeps base64 data from
    # ever spelling a path such as "/tmp" in a saved notebook
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("/", "\\u002f")
    module_body = _module_body(script, name)
    # A classic script in a function scope: it can find its own element (modules have no currentScript), runs
    # once per output, and several outputs on one page do not share names.
    boot = (
        "(function () {\nconst root = document.currentScript.parentElement;\n"
        f"{module_body}\n"
        "if (!root.dataset.rendered) { root.dataset.rendered = '1';"
        " const data = JSON.parse(root.querySelector('script[type=\"application/json\"]').textContent);"
        " root.querySelector('.nm-fallback').remove();"
        " render({ model: staticModel(data), el: root }); }\n})();"
    )
    return (
        f'<div class="nm-root"><style>{css}</style>{fallback_html}'
        f'<script type="application/json">{payload}</script><script>{boot}</script></div>'
    )


_EXPORT = "export default { render };"


def pack(array_bytes: bytes) -> bytes:
    """Deflate (zlib format) bytes for the browser, which inflates them with `DecompressionStream`."""
    return zlib.compress(array_bytes, 6)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
