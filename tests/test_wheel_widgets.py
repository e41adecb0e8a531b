"""The wheel carries the front ends of `widgets/` (the views and their shared helpers), the installed package finds
them in itself, and both views render in Chromium from it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Runs against the installed wheel: writes the static page and the live widget's synced state (bytes as base64).
SCRIPT = """
import base64, json, sys, torch, neuronmap
from neuronmap.attention import AttentionPatterns
assert neuronmap.__file__.startswith(sys.argv[1]), neuronmap.__file__
from neuronmap.widget import WIDGETS_DIR
n = 12
pattern = torch.softmax(torch.randn(1, 3, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9), -1)
tokens = torch.arange(3, 3 + n)[None]
patterns = AttentionPatterns({0: pattern, 1: pattern.flip(1)}, tokens, torch.ones_like(tokens), [[f"w{i}" for i in range(n)]], "wheel")
patterns.save_html(sys.argv[2] + "/static.html")
widget = patterns.widget(heads=[1])
FIELDS = "layers n_heads layer heads prompt prompts tokens n_total thumb_size thumbs detail detail_key note".split()
state = {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
         for key, value in ((key, getattr(widget, key)) for key in FIELDS)}
exported = {"state": state, "esm": widget._esm, "css": widget._css, "widgets_dir": str(WIDGETS_DIR)}
json.dump(exported, open(sys.argv[2] + "/widget.json", "w"))
"""

# A stand-in for anywidget's model in the page: bytes arrive as DataViews, as anywidget delivers traitlets.Bytes.
HARNESS = """
async ({ state, esm }) => {
  const bytes = (text) => { const raw = Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); return new DataView(raw.buffer); };
  const values = { ...state, thumbs: bytes(state.thumbs), detail: bytes(state.detail) };
  const model = { get: (k) => values[k], set: (k, v) => { values[k] = v; }, save_changes() {}, on() {}, off() {} };
  const url = URL.createObjectURL(new Blob([esm], { type: "text/javascript" }));
  const module = await import(url);
  const el = document.createElement("div");
  document.body.append(el);
  module.default.render({ model, el });
}
"""


WIDGETS = Path(__file__).resolve().parent.parent / "widgets"


def test_the_wheel_ships_the_front_ends(installed_wheel):
    checkout = {path.name: path.read_bytes() for path in WIDGETS.iterdir() if path.suffix in (".js", ".css")}
    assert {"common.js", "common.css", "attention.js", "attention.css", "graph.js", "sae.js"} <= set(checkout)
    shipped = installed_wheel / "neuronmap" / "widgets"
    assert {path.name: path.read_bytes() for path in shipped.iterdir()} == checkout
    record = next(installed_wheel.glob("neuronmap-*.dist-info/RECORD")).read_text()
    assert all(f"neuronmap/widgets/{name}," in record for name in checkout)


def test_views_render_from_the_installed_wheel(installed_wheel, tmp_path, page):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(installed_wheel), str(tmp_path)],
        env={"PYTHONPATH": str(installed_wheel), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    exported = json.loads((tmp_path / "widget.json").read_text())
    shipped = installed_wheel / "neuronmap" / "widgets"
    assert Path(exported["widgets_dir"]) == shipped.resolve()
    # the bundle ends with the shipped view (less its import line) after the shipped helpers it calls
    view = re.sub(r'^import \{[^}]*\} from "\./common\.js";\n', "", (shipped / "attention.js").read_text(), flags=re.M)
    assert exported["esm"].endswith("\n" + view)
    common = (shipped / "common.js").read_text()
    for name in ("asBytes", "inflate", "element", "textOn"):
        helper = re.search(rf"^(?:async )?function {name}\(.*?^}}\n", common, re.M | re.S).group(0)
        assert exported["esm"].count(helper) == 1 and exported["esm"].index(helper) < exported["esm"].index(view), name
    assert exported["css"] == (shipped / "common.css").read_text() + "\n" + (shipped / "attention.css").read_text()

    page.goto((tmp_path / "static.html").as_uri())
    page.wait_for_selector(".nm-attn[data-ready='0:0']", timeout=10_000)
    assert page.locator(".nm-token").count() == 12

    page.goto("about:blank")
    page.add_style_tag(content=exported["css"])
    page.evaluate(HARNESS, {"state": exported["state"], "esm": exported["esm"]})
    page.wait_for_selector(".nm-attn[data-ready='0:0']", timeout=10_000)
    assert page.locator(".nm-head.nm-selected").get_attribute("data-head") == "1"
    page.hover(".nm-token[data-index='5']")
    assert page.locator(".nm-token[data-weight]").count() == 12
    assert page.errors == [] and page.external_requests == []

