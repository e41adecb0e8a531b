"""An executed report notebook as one standalone HTML page that renders with no network.

nbconvert's lab template is used without its require.js, MathJax, mermaid and widget-manager scripts (all loaded
from CDNs); widget views are dropped (their static fallback stays), and plotly figures, which a kernel emits as
plotly's JSON mime type for JupyterLab to draw, are drawn by plotly.js embedded once in the page, deflated (a third
of its size) and inflated by the browser's `DecompressionStream`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from ..display import script_json
from ..widget import WIDGET_VIEW, b64, pack

PLOTLY_JSON = "application/vnd.plotly.v1+json"
_PAGE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{{ resources.neuronmap_head_js }}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# Inflates and runs plotly.js once; every figure waits on the promise, so figures may come in any order.
_PLOTLY_LOADER = """<script type="application/octet-stream" id="nm-plotly-js">{packed}</script>
<script>
window.nmPlotly = (async () => {{
  const text = document.getElementById("nm-plotly-js").textContent;
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const inflated = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  const script = document.createElement("script");
  script.textContent = await new Response(inflated).text();
  document.head.append(script);
  return window.Plotly;
}})();
</script>"""
_FIGURE = """<div class="nm-plotly"><div class="nm-plotly-figure"></div><script type="application/json">{spec}</script>
<script>(function () {{
const root = document.currentScript.parentElement;
const spec = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
window.nmPlotly.then((Plotly) => Plotly.newPlot(root.querySelector(".nm-plotly-figure"), spec.data || [], spec.layout || {{}},
  Object.assign({{ responsive: true, displaylogo: false }}, spec.config || {{}})));
}})();</script></div>"""


def export_html(notebook: Any, *, title: str) -> str:
    """One standalone page of an executed notebook (left as it is): outputs only (the report's prose and views, not
    its code), widget views replaced by their static HTML, plotly figures drawn offline, no script from the network."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    notebook = copy.deepcopy(notebook)
    figures = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            data.pop(WIDGET_VIEW, None)
            if PLOTLY_JSON in data:
                output["data"] = {"text/html": _FIGURE.format(spec=script_json(data[PLOTLY_JSON]))}
                figures += 1
    notebook.metadata.pop("widgets", None)
    notebook.metadata["title"] = title
    exporter = HTMLExporter(
        extra_loaders=[DictLoader({"neuronmap_report.html.j2": _PAGE_TEMPLATE})], template_file="neuronmap_report.html.j2",
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    page, _ = exporter.from_notebook_node(notebook, resources={"neuronmap_head_js": _plotly_loader() if figures else ""})
    return page


@functools.cache
def _plotly_loader() -> str:
    from plotly.offline import get_plotlyjs

    return _PLOTLY_LOADER.format(packed=b64(pack(get_plotlyjs().encode("utf-8"))))
