"""The wheel carries the widget front ends, and both views render in Chromium from the installed package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Runs against the installed wheel: writes the static page and the live widget's synced state (bytes as base64).
SCRIPT = """
import base64, json, sys, torch, neuronmap
from neuronmap.attention import AttentionPatterns
assert neuronmap.__file__.startswith(sys.argv[1]), neuronmap.__file__
n = 12
pattern = torch.softmax(torch.randn(1, 3, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9), -1)
tokens = torch.arange(3, 3 + n)[None]
patterns = AttentionPatterns({0: pattern, 1: pattern.flip(1)}, tokens, torch.ones_like(tokens), [[f"w{i}" for i in range(n)]], "wheel")
patterns.save_html(sys.argv[2] + "/static.html")
widget = patterns.widget(heads=[1])
FIELDS = "layers n_heads layer heads prompt prompts tokens n_total thumb_size thumbs detail detail_key note".split()
state = {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
         for key, value in ((key, getattr(widget, key)) for key in FIELDS)}
json.dump({"state": state, "esm": widget._esm, "css": widget._css}, open(sys.argv[2] + "/widget.json", "w"))
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


def test_the_wheel_ships_the_front_ends(installed_wheel):
    shipped = {path.name for path in (installed_wheel / "neuronmap" / "widgets").iterdir()}
    assert {"attention.js", "attention.css"} <= shipped
    record = next(installed_wheel.glob("neuronmap-*.dist-info/RECORD")).read_text()
    assert "neuronmap/widgets/attention.js" in record and "neuronmap/widgets/attention.css" in record


def test_views_render_from_the_installed_wheel(installed_wheel, tmp_path, page):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(installed_wheel), str(tmp_path)],
        env={"PYTHONPATH": str(installed_wheel), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    exported = json.loads((tmp_path / "widget.json").read_text())
    assert exported["esm"] == (installed_wheel / "neuronmap" / "widgets" / "attention.js").read_text()

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

