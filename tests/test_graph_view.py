"""The interactive layered-graph view (`widgets/graph.js`): what it is sent, the live widget's attention on demand,
and in Chromium: the static page draws, the top-k slider and the threshold re-filter the edges, hovering tells a
score, selecting a node highlights its edges, the wheel zooms, and clicking a head opens its attention pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronmap as nm
from neuronmap.graph_widget import STATIC_EDGES, GraphView, graph_data
from neuronmap.graphview import Edge, Node
import wcag
from test_browser_attention import ARTIFACTS, text_contrasts
from test_circuits_discovery import _induction

HOSTILE = '<img src=x onerror="window.pwned=1">'


def _parts(nodes, edges, **texts):
    return {"nodes": nodes, "edges": edges, "title": "t", "row_labels": ["bottom", "top"], **texts}


def test_edges_are_sent_strongest_first_as_binary_with_their_ports():
    nodes = [Node("embed", "embed", 0, 0), Node("A0.1", "0.1", 1, 1, head=(0, 1)), Node("logits", "logits", 2, 0)]
    edges = [
        Edge("embed", "A0.1", 0.1, "q"), Edge("embed", "A0.1", -0.5, "k"), Edge("A0.1", "logits", 0.3),
        Edge("embed", "nowhere", 9.0),  # names no node: not drawable, not sent
    ]
    data = graph_data(_parts(nodes, edges))
    assert np.frombuffer(data["edge_values"], "<f4").tolist() == pytest.approx([-0.5, 0.3, 0.1])
    assert np.frombuffer(data["edge_ends"], "<i4").reshape(-1, 2).tolist() == [[0, 1], [1, 2], [0, 1]]
    assert list(data["edge_ports"]) == [2, 0, 1]  # key, none, query
    assert [node["head"] for node in data["nodes"]] == [None, [0, 1], None]
    rounded = graph_data(_parts(nodes, [Edge("embed", "logits", 0.123456789)]), digits=4)
    assert np.frombuffer(rounded["edge_values"], "<f4").tolist() == [np.float32(0.1235)]
    cut = graph_data(_parts(nodes, edges), limit=2)
    assert len(cut["edge_ports"]) == 2 and "the strongest 2 of 3 edges embedded" in cut["note"]


def test_the_static_page_embeds_a_bounded_graph_with_hostile_text_escaped():
    nodes = [Node(f"n{i}", HOSTILE, i % 2, i // 2, title=HOSTILE) for i in range(200)]
    edges = [Edge(f"n{2 * i}", f"n{2 * i + 1}", float(i + 1)) for i in range(100)] * 60
    view = GraphView(_parts(nodes, edges, description=HOSTILE, note=HOSTILE))
    html = view._repr_html_()
    assert HOSTILE not in html and "<img" not in html
    assert f"the strongest {STATIC_EDGES:,} of 6,000 edges embedded" in html
    assert repr(view) == "GraphView('t', 200 nodes, 6,000 edges)"


class _Patterns:
    """Counts how often the view asks for the attention patterns."""

    def __init__(self, patterns):
        self.patterns, self.calls = patterns, 0

    def __call__(self):
        self.calls += 1
        return self.patterns


@pytest.fixture(scope="module")
def induction_graph():
    model, clean, corrupt, metric = _induction()
    return nm.circuits.eap(model, clean, corrupt, metric)


def test_the_live_widget_computes_the_patterns_once_when_a_head_is_first_asked_for(induction_graph):
    patterns = induction_graph._clean_patterns()
    source = _Patterns(patterns)
    widget = GraphView(induction_graph._view_parts(), pattern_source=source).widget()
    assert widget.attention is None and source.calls == 0  # nothing computed before a head is clicked
    assert np.frombuffer(widget.edge_values, "<f4").size == induction_graph.graph.n_edges  # live: every edge
    widget.head_request = "1.2"
    assert source.calls == 1 and (widget.attention.layer, widget.attention.heads) == (1, [2])
    assert widget.attention.detail_key == "1:0"
    widget.head_request = "0.1"  # later heads are chosen on the attention widget by the front end
    assert source.calls == 1


def test_the_live_widget_says_why_it_has_no_patterns(induction_graph):
    widget = induction_graph.view(patterns=None).widget()
    widget.head_request = "1.2"
    assert widget.attention is None and "view(patterns=" in widget.attention_error
    only_layer_0 = nm.attention(induction_graph._source[0], induction_graph._clean_patterns().tokens, layers=[0])
    widget = induction_graph.view(patterns=only_layer_0).widget()
    widget.head_request = "1.2"
    assert widget.attention is None and "not 1" in widget.attention_error


def test_a_scored_graph_embeds_the_clean_prompts_attention_and_one_read_from_json_none(induction_graph):
    html = induction_graph._repr_html_()
    assert '"attention":{"layers":[0,1]' in html and '"attention_error":""' in html
    again = nm.CircuitGraph.from_json(induction_graph.to_json())._repr_html_()
    assert '"attention":null' in again and "view(patterns=nm.attention(model, prompts))" in again


def _open(page, html, tmp_path, name="graph.html"):
    path = tmp_path / name
    path.write_text(f"<!doctype html><meta charset='utf-8'><body>{html}</body>", encoding="utf-8")
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-graphview[data-ready]", timeout=10_000)
    return page.locator(".nm-graphview")


def _drawn(view) -> int:
    return view.locator("path.nm-edge").count()


@pytest.mark.browser
def test_in_chromium_the_controls_refilter_and_clicking_a_head_opens_its_attention(page, tmp_path, induction_graph):
    view = _open(page, induction_graph._repr_html_(), tmp_path)
    strengths = induction_graph.scores.abs()[induction_graph.graph.valid].sort(descending=True).values
    n = len(strengths)
    assert _drawn(view) == min(100, n) == int(view.get_attribute("data-drawn"))
    threshold = float(strengths[20])
    view.locator(".nm-threshold").fill(f"{threshold:.6g}")
    expected = int((strengths[:100] >= float(f"{threshold:.6g}") * (1 - 1e-6)).sum())
    assert abs(_drawn(view) - expected) <= 1 and _drawn(view) < 100  # float32 on the page, rounding at the boundary
    view.locator(".nm-threshold").fill("0")
    view.locator(".nm-k").evaluate("el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    assert _drawn(view) == 1 and "drawing 1 of" in view.locator(".nm-count").inner_text()
    view.locator(".nm-k").evaluate("el => { el.value = el.max; el.dispatchEvent(new Event('input')); }")
    assert _drawn(view) == n

    name, score = induction_graph.top(1)[0]
    point = view.locator("path.nm-edge").last.evaluate(  # the strongest is drawn last, on top
        "p => { const q = p.getPointAtLength(p.getTotalLength() * 0.3).matrixTransform(p.getScreenCTM()); return [q.x, q.y]; }"
    )
    page.mouse.move(*point)
    shown = view.locator(".nm-info").first.inner_text()
    assert shown.startswith(f"edge {name.replace('->', ' → ')}: score ")
    assert float(shown.rsplit(" ", 1)[1]) == pytest.approx(score, rel=1e-3)

    view.locator('.nm-node[data-id="A1.2"]').click()
    into = [edge for edge, _ in induction_graph.top(n) if edge.split("->")[1].startswith("A1.2")]
    out_of = [edge for edge, _ in induction_graph.top(n) if edge.startswith("A1.2->")]
    assert view.locator("path.nm-hi").count() == len(into) + len(out_of)
    assert view.locator("path.nm-dim").count() == n - len(into) - len(out_of)
    assert f"{len(into)} input and {len(out_of)} output edges" in view.locator(".nm-info").first.inner_text()
    panel = view.locator(".nm-attn-panel .nm-attn[data-ready='1:0']")
    panel.wait_for(timeout=10_000)
    assert panel.locator(".nm-head.nm-selected").get_attribute("data-head") == "2"
    n_tokens = induction_graph._clean_patterns().tokens.shape[1]
    assert panel.locator(".nm-token").count() == n_tokens
    assert panel.locator(".nm-matrix canvas").evaluate("c => c.width") == n_tokens
    assert "attention of head 1.2" in view.locator(".nm-attn-heading").inner_text()

    before = view.get_attribute("data-scale")
    page.mouse.move(300, 300)
    page.mouse.wheel(0, -400)
    assert float(view.get_attribute("data-scale")) > float(before)  # zoomed in about the pointer
    transform = view.locator("g.nm-view").get_attribute("transform")
    box = view.locator(".nm-graph-box").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 10, box["y"] + 10)  # the background: no node there
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 110, box["y"] + 60, steps=5)
    page.mouse.up()
    assert view.locator("g.nm-view").get_attribute("transform") != transform  # panned
    for selector in (".nm-graph-title", ".nm-graph-desc", ".nm-bar label", ".nm-count", ".nm-info", ".nm-graph-note"):
        for ratio, item in text_contrasts(view.locator(selector)):
            assert ratio >= wcag.AA, (selector, ratio, item)
    assert page.errors == [] and page.external_requests == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "circuit_graph_interactive.png"), full_page=True)


@pytest.mark.browser
def test_in_chromium_hostile_labels_stay_text(page, tmp_path):
    nodes = [Node("a", HOSTILE, 0, 0, title=HOSTILE), Node("b", "<b>b</b>", 1, 0, head=(0, 0))]
    view = _open(page, GraphView(_parts(nodes, [Edge("a", "b", 1.0)], description=HOSTILE))._repr_html_(), tmp_path)
    assert page.evaluate("window.pwned") is None and page.errors == []
    assert view.locator(".nm-node text").evaluate_all("ts => ts.map(t => t.textContent)") == [HOSTILE, "<b>b</b>"]
    view.locator('.nm-node[data-id="b"]').click()  # a head without patterns says so
    assert "view(patterns=" in view.locator(".nm-attn-panel").inner_text()
    assert page.external_requests == []


def test_a_graph_of_a_model_with_grouped_query_attention_points_kv_edges_at_the_groups_first_head():
    from conftest import make_model, tokens

    model = nm.load(make_model("llama"))
    clean = tokens(2, 5, seed=1)
    corrupt = clean.clone()
    corrupt[:, 1] = tokens(2, 1, seed=4)[:, 0]
    result = nm.circuits.eap(model, clean, corrupt, lambda logits: logits[:, -1, 3] - logits[:, -1, 4])
    data = graph_data(result._view_parts())
    ids = [node["id"] for node in data["nodes"]]
    ends = np.frombuffer(data["edge_ends"], "<i4").reshape(-1, 2)
    ports = np.frombuffer(data["edge_ports"], np.uint8)
    group = result.graph.n_heads // result.graph.n_kv_heads
    targets = {ids[t] for t, port in zip(ends[:, 1], ports) if port in (2, 3)}
    assert group == 2 and targets and all(int(name.split(".")[1]) % group == 0 for name in targets)
    assert torch.isfinite(torch.from_numpy(np.frombuffer(data["edge_values"], "<f4").copy())).all()


@pytest.mark.browser
def test_in_chromium_a_circuit_tracer_graph_opens_offline_and_its_threshold_refilters(page, tmp_path):
    from test_circuits_tracer import PEER_FILE

    graph = nm.circuits.read_attribution_graph(PEER_FILE)
    view = _open(page, graph._repr_html_(), tmp_path)
    weights = sorted((abs(link.weight) for link in graph.links), reverse=True)
    assert _drawn(view) == min(100, len(weights))
    assert weights[9] > weights[10]
    view.locator(".nm-threshold").fill(f"{(weights[9] + weights[10]) / 2:.9g}")
    assert _drawn(view) == 10
    assert view.locator(".nm-node").count() == len(graph._view_parts()["nodes"])
    assert page.errors == [] and page.external_requests == []
