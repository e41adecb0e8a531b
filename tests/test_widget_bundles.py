"""The front ends in `widgets/`: found in the checkout, and bundled so each shared helper is defined exactly once.

Every view imports its helpers from `widgets/common.js`; `neuronmap.widget.front_end` puts the helpers a bundle uses
in front of its views. A helper copied back into a view, helpers bundled twice (as when a view bundles another), a
helper left out, or an import the helpers' module does not export would each give a bundle that defines a name twice
or calls one it never defines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neuronmap import widget
from neuronmap.widget import front_end, static_page

ROOT = Path(__file__).resolve().parent.parent
WIDGETS = ROOT / "widgets"
VIEWS = sorted(path.stem for path in WIDGETS.glob("*.js") if path.stem != "common")


def _declared(script: str, name: str) -> int:
    """How many times `script` declares `name` (a function, class, const, let or var), at any depth."""
    return len(re.findall(rf"\b(?:function\*?|class|const|let|var)\s+{re.escape(name)}\b", script))


def _helpers() -> list[str]:
    """The names `common.js` declares at its top level, read from the file itself."""
    common = (WIDGETS / "common.js").read_text()
    return re.findall(r"^(?:async )?(?:function|const|let|class) (\w+)", common, re.M)


def test_the_checkout_is_where_an_editable_install_finds_the_front_ends():
    import neuronmap

    assert Path(neuronmap.__file__).resolve().parent == ROOT / "neuronmap"  # this interpreter runs the checkout
    assert widget.WIDGETS_DIR == widget.widgets_dir() == WIDGETS
    assert not (ROOT / "neuronmap" / "widgets").exists()
    assert VIEWS == ["attention", "graph", "sae"]


def test_the_views_import_the_shared_helpers_and_never_define_them():
    helpers = _helpers()
    assert {"asBytes", "inflate", "element", "svgElement", "ownKeys", "shown", "textOn"} <= set(helpers)
    for view in VIEWS:
        script = (WIDGETS / f"{view}.js").read_text()
        imported = re.findall(r'^import \{([^}]*)\} from "\./common\.js";$', script, re.M)
        assert len(imported) == 1, view
        assert {name.strip() for name in imported[0].split(",")} <= set(helpers), view
        assert [name for name in helpers if _declared(script, name)] == [], view


def _called(script: str, name: str) -> bool:
    return re.search(rf"(?<!function )(?<![\w.]){re.escape(name)}\(", script) is not None


@pytest.mark.parametrize("view", VIEWS)
def test_each_bundle_defines_every_helper_it_calls_once_before_the_views(view):
    script, css = front_end(view)
    first_view_line = min(
        script.index((WIDGETS / f"{name}.js").read_text().splitlines()[0])
        for name in (view, *widget.USES.get(view, ()))
    )
    called = [name for name in _helpers() if _called(script, name)]
    assert {"asBytes", "element", "ownKeys"} <= set(called)
    for name in _helpers():
        assert _declared(script, name) == (name in called), name
    for name in called:
        assert script.index(f"function {name}(") < first_view_line, name
    assert "import " not in script and "export {" not in script
    assert script.count("export default") == 1 and script.rstrip().endswith("export default { render };")
    assert css.startswith((WIDGETS / "common.css").read_text()) and css.count(".nm-root .nm-fallback{") == 1
    page = static_page(view, {}, '<div class="nm-fallback"></div>')
    assert all(_declared(page, name) == (name in called) for name in _helpers())


def test_a_bundle_holds_only_the_helpers_its_views_use():
    attention, _ = front_end("attention")
    graph, _ = front_end("graph")  # graph bundles the attention viewer: the union of both views' helpers
    assert not _called(attention, "svgElement") and "function svgElement(" not in attention
    assert _called(attention, "textOn") and "function luminance(" in attention  # textOn's own helper comes along
    assert all(f"function {name}(" in graph for name in ("svgElement", "inflate", "textOn", "luminance"))


def test_a_view_importing_what_the_helpers_do_not_export_is_refused(tmp_path, monkeypatch):
    for path in WIDGETS.glob("common.*"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "broken.css").write_text("")
    (tmp_path / "broken.js").write_text(
        'import { element, makeChart } from "./common.js";\n\nfunction render() {}\n\nexport default { render };\n'
    )
    monkeypatch.setattr(widget, "WIDGETS_DIR", tmp_path)
    with pytest.raises(AssertionError, match=r"broken\.js imports \['makeChart'\] from \./common\.js"):
        front_end("broken")
