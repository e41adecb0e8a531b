"""The live half of the rendering contract: the front ends in `widgets/` bundled for the page, and when to show them.

A result's mime bundle always holds its static HTML; the anywidget view is added only when an interactive
front end executes the cell. Headless runners (papermill, `nbconvert --execute`, nbclient) would otherwise
store widget state that an exported page can only show by loading the widget manager from a CDN, which
offline shows nothing; their outputs keep the static view instead.
"""

from __future__ import annotations

import base64
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .display import script_json

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
FORCE_ENV = "NEURONMAP_WIDGETS"
"""Set to 1 or 0 to always or never add the live widget to results' mime bundles."""
COMMON = "common"
"""The front end holding the helpers every view imports (`widgets/common.js` and `common.css`)."""


def widgets_dir() -> Path:
    """Where the front ends are: `neuronmap/widgets` in an installed wheel, the checkout's top-level `widgets/`
    otherwise (a source tree or an editable install, whose package is the checkout's `neuronmap/`)."""
    package = Path(__file__).resolve().parent
    shipped = package / "widgets"
    return shipped if (shipped / f"{COMMON}.js").is_file() else package.parent / "widgets"


WIDGETS_DIR = widgets_dir()


def front_end(name: str) -> tuple[str, str]:
    """The ES module and CSS of one shipped front end, e.g. `front_end("attention")`, bundled into one of each.

    Each view is an ES module that imports its helpers from `widgets/common.js`; the bundle starts with the helpers
    its views import (and those helpers' own helpers), each once, then the views with their import lines dropped.
    A front end that opens another's view inside its own (the graph view shows a head's attention pattern in the
    attention viewer) names it in `USES`; that module comes after the helpers, in a scope of its own, as
    `<name>View` with its `render` and `staticModel`.
    """
    common, common_css = _files(COMMON)
    helpers, exported = _helpers(common)
    scripts, styles, imported = [], [common_css], set()
    for used in USES.get(name, ()):
        script, css = _files(used)
        body = _module_body(_without_imports(script, used, exported, imported), used)
        scripts.append(f"const {used}View = (() => {{\n{body}\nreturn {{ render, staticModel }};\n}})();")
        styles.append(css)
    script, css = _files(name)
    scripts.append(_without_imports(script, name, exported, imported))
    return "\n".join([_needed(helpers, imported), *scripts]), "\n".join([*styles, css])


USES = {"graph": ("attention",)}
"""The front ends each front end bundles in front of itself."""


def _files(name: str) -> tuple[str, str]:
    return (WIDGETS_DIR / f"{name}.js").read_text(encoding="utf-8"), (WIDGETS_DIR / f"{name}.css").read_text(encoding="utf-8")


_SHARED_EXPORT = re.compile(r"^export \{([^}]*)\};\n?\Z", re.M)
_SHARED_IMPORT = re.compile(r'^import \{([^}]*)\} from "\./common\.js";\n', re.M)
_HELPER = re.compile(r"^(?://[^\n]*\n)*(?:async )?function (\w+)\(", re.M)


def _helpers(script: str) -> tuple[dict[str, str], set[str]]:
    """The helpers' module as its functions by name, each with the comment above it, and the names it exports."""
    export = _SHARED_EXPORT.search(script)
    if export is None:
        raise AssertionError(f"widgets/{COMMON}.js must end its module with one `export {{ name, ... }};` line")
    found = list(_HELPER.finditer(script, 0, export.start()))
    ends = [match.start() for match in found[1:]] + [export.start()]
    helpers = {match.group(1): script[match.start() : end].rstrip() + "\n" for match, end in zip(found, ends)}
    return helpers, _names(export.group(1))


def _needed(helpers: dict[str, str], imported: set[str]) -> str:
    """The helpers that `imported` names, with every helper they call, in the module's order."""
    needed, todo = set(), list(imported)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [other for other in helpers if re.search(rf"\b{other}\(", helpers[name])]
    return "\n".join(code for name, code in helpers.items() if name in needed)


def _without_imports(script: str, name: str, exported: set[str], imported: set[str]) -> str:
    """A view's module without its line importing the shared helpers (added to `imported`), which the bundle defines
    in front of it."""
    imports = _SHARED_IMPORT.findall(script)
    if len(imports) > 1:
        raise AssertionError(f"widgets/{name}.js must import from ./common.js in one line")
    names = set().union(*map(_names, imports))
    if names - exported:
        raise AssertionError(
            f"widgets/{name}.js imports {sorted(names - exported)} from ./common.js, which exports {sorted(exported)}"
        )
    imported |= names
    return _SHARED_IMPORT.sub("", script)


def _names(listed: str) -> set[str]:
    return {part.strip() for part in listed.split(",") if part.strip()}


def _module_body(script: str, name: str) -> str:
    """The module without its closing `export default { render };`, which every view ends with."""
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
    payload = script_json(data)
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
