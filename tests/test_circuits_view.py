"""The circuit graph's static view (the shared layered-graph SVG): escaped, bounded, q/k/v told apart, signs as
colours; and in Chromium: it draws, hovering tells an edge's score, hostile labels stay text."""

from __future__ import annotations

import re

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import CircuitGraph, Graph, eap
from neuronmap.graphview import Edge, Node, graph_html
from neuronmap.heatmap import BLUE, RED
from conftest import make_model, tokens
from test_browser_attention import ARTIFACTS

HOSTILE = "<script>window.pwned=1</script>"


def _scores(graph, seed=0):
    raw = torch.randn(graph.valid.shape, generator=torch.Generator().manual_seed(seed)) * graph.valid
    return CircuitGraph(graph, raw, 1.0, 0.0, method="EAP", metric="logit difference", labels=["a", "b"])


def test_gpt2_smalls_32491_edges_draw_the_strongest_400_and_say_so():
    result = _scores(Graph(12, 12, model_name="gpt2-small"))
    page = result._repr_html_()
    assert page.count("<path") == 400 and "showing the 400 strongest of 32,491 edges" in page
    assert len(page.encode()) < 400_000
    assert page.count("<rect") == 1 + 12 * 13 + 1  # every node is drawn, edges or not
    strongest = result.top(1)[0][0].replace("->", " → ")
    assert strongest in page


def test_edges_into_queries_keys_and_values_are_told_apart_and_signs_are_colours():
    g = Graph(2, 2)
    raw = torch.zeros(g.valid.shape)
    for (sender, receiver), value in {("embed", "A1.0.q"): 0.5, ("embed", "A1.0.k"): -0.5, ("embed", "A1.0.v"): 0.25}.items():
        raw[g.sender(sender), g.receiver(receiver)] = value
    result = CircuitGraph(g, raw, 1.0, 0.0, method="EAP", metric="m")
    result.circuit = raw != 0
    result.circuit_faithfulness = 0.5
    page = result._repr_html_()
    paths = re.findall(r'<path [^>]*stroke="(#[0-9a-f]{6})"[^>]*stroke-dasharray="([^"]*)"><title>([^<]*)</title>', page)
    by_title = {title: (colour, dashes) for colour, dashes, title in paths}
    red, blue = "#{:02x}{:02x}{:02x}".format(*RED), "#{:02x}{:02x}{:02x}".format(*BLUE)
    assert by_title == {
        "embed → A1.0.q: +0.5": (red, "none"),
        "embed → A1.0.k: -0.5": (blue, "5 3"),
        "embed → A1.0.v: +0.25": (red, "1.5 2.5"),
    }
    assert "circuit of 3 edges, faithfulness 0.500" in page and "key" in page


def test_hostile_labels_and_titles_are_escaped():
    page = graph_html(
        [Node("a", HOSTILE, 0, 0, title=HOSTILE), Node("b", "b", 1, 0)], [Edge("a", "b", 1.0, title=HOSTILE)],
        title=HOSTILE, row_labels=[HOSTILE], description=HOSTILE, note=HOSTILE,
    )
    assert "<script>" not in page
    assert page.count("&lt;script&gt;") == 8  # title, its aria-label, row label, node label and title, edge title, description, note


def test_a_scored_models_view_holds_its_faithfulness_curve():
    model = nm.load(make_model("gpt2"))
    clean = tokens(2, 6, seed=2)
    corrupt = clean.clone()
    corrupt[:, 1] = tokens(2, 1, seed=3)[:, 0]
    result = eap(model, clean, corrupt, lambda logits: logits[:, -1, 5] - logits[:, -1, 7], per_position=True)
    assert "summed over the 6 positions" in result._repr_html_()
    merged = eap(model, clean, corrupt, lambda logits: logits[:, -1, 5] - logits[:, -1, 7])
    merged.faithfulness([3, 10])
    assert "random edges" in merged._repr_html_()


@pytest.mark.browser
def test_without_scripts_the_svg_draws_in_chromium_and_hover_tells_an_edges_score(browser, tmp_path):
    """Where scripts do not run (GitHub, an untrusted notebook), the layered-graph SVG is what shows."""
    g = Graph(2, 4, model_name=HOSTILE)
    result = _scores(g)
    path = tmp_path / "graph.html"
    path.write_text(f"<!doctype html><meta charset='utf-8'><body>{result._repr_html_()}</body>", encoding="utf-8")
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.goto(path.as_uri())
    assert HOSTILE in page.locator(".nm-graph-title").inner_text()
    box = page.locator(".nm-graph svg").bounding_box()
    assert box["width"] > 300 and box["height"] > 300
    assert page.locator(".nm-graph svg path").count() == int(g.valid.sum())
    name, score = result.top(1)[0]
    titles = page.eval_on_selector_all(".nm-graph svg path > title", "ts => ts.map(t => t.textContent)")
    assert f"{name.replace('->', ' → ')}: {score:+.4g}" in titles
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "circuit_graph.png"), full_page=True)
    context.close()
