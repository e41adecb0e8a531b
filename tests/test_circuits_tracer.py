"""circuit-tracer's attribution-graph JSON, read and drawn: the reference file was written by circuit-tracer's own
`create_graph_files` (tests/data/make_circuit_tracer_graph.py says how), and every value is checked against that
file loaded with `json` here."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from neuronmap.circuits import AttributionGraph, read_attribution_graph
from neuronmap.errors import InputError
from neuronmap.graphview import MAX_EDGES, graph_html

PEER_FILE = Path(__file__).parent / "data" / "circuit_tracer_graph.json"
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture()
def raw() -> dict:
    return json.loads(PEER_FILE.read_text(encoding="utf-8"))


def test_the_peer_file_reads_with_every_node_link_and_prompt_token(raw):
    graph = read_attribution_graph(PEER_FILE)
    assert isinstance(graph, AttributionGraph)
    assert len(graph.nodes) == len(raw["nodes"]) and len(graph.links) == len(raw["links"])
    assert graph.prompt_tokens == raw["metadata"]["prompt_tokens"]
    assert graph.metadata["slug"] == raw["metadata"]["slug"] and graph.metadata["scan"] == raw["metadata"]["scan"]
    for node, written in zip(graph.nodes, raw["nodes"]):
        assert (node.id, node.kind, node.position, node.clerp) == (
            written["node_id"], written["feature_type"], written["ctx_idx"], written["clerp"])
        assert node.activation == written["activation"] and node.influence == written["influence"]
        assert node.token_prob == written["token_prob"] and node.is_target_logit == written["is_target_logit"]
        if written["feature_type"] in ("embedding", "logit"):
            assert node.layer is None
        else:
            assert node.layer == int(written["layer"])
    assert [(link.source, link.target, link.weight) for link in graph.links] == [
        (link["source"], link["target"], link["weight"]) for link in raw["links"]]


def test_the_peer_file_holds_every_kind_circuit_tracer_writes(raw):
    kinds = {node["feature_type"] for node in raw["nodes"]}
    assert kinds == {"embedding", "cross layer transcoder", "mlp reconstruction error", "logit"}
    graph = read_attribution_graph(raw)
    target = [node for node in graph.nodes if node.is_target_logit]
    assert len(target) == 1 and target[0].kind == "logit"
    assert target[0].token_prob == max(node["token_prob"] for node in raw["nodes"])


def test_a_path_and_the_loaded_dict_read_alike(raw):
    from_path, from_dict = read_attribution_graph(str(PEER_FILE)), read_attribution_graph(raw)
    assert from_path.nodes == from_dict.nodes and from_path.links == from_dict.links


def test_top_links_are_the_largest_weights_by_magnitude(raw):
    expected = sorted(raw["links"], key=lambda link: abs(link["weight"]), reverse=True)[:5]
    assert read_attribution_graph(raw).top(5) == [(f"{l['source']}->{l['target']}", l["weight"]) for l in expected]


def test_to_networkx_has_an_edge_per_link_with_its_weight(raw):
    pytest.importorskip("networkx")
    g = read_attribution_graph(raw).to_networkx()
    assert set(g.nodes) == {node["node_id"] for node in raw["nodes"]}
    assert {(s, t): w for s, t, w in g.edges(data="weight")} == {
        (link["source"], link["target"]): link["weight"] for link in raw["links"]}
    first = raw["nodes"][0]
    assert g.nodes[first["node_id"]]["feature_type"] == first["feature_type"]
    assert g.graph["slug"] == raw["metadata"]["slug"]


def test_rows_put_embeddings_at_the_bottom_a_row_per_layer_and_logits_on_top(raw):
    parts = read_attribution_graph(raw)._view_parts()
    by_id = {node.id: node for node in parts["nodes"]}
    top_layer = max(int(n["layer"]) for n in raw["nodes"] if n["feature_type"] not in ("embedding", "logit"))
    assert parts["row_labels"] == ["embeddings", *(f"layer {layer}" for layer in range(top_layer + 1)), "logits"]
    for written in raw["nodes"]:
        row = by_id[written["node_id"]].row
        if written["feature_type"] == "embedding":
            assert row == 0
        elif written["feature_type"] == "logit":
            assert row == len(parts["row_labels"]) - 1
        else:
            assert row == int(written["layer"]) + 1


def test_columns_follow_token_positions_and_share_no_place(raw):
    parts = read_attribution_graph(raw)._view_parts()
    position = {n["node_id"]: n["ctx_idx"] for n in raw["nodes"]}
    places = [(node.row, node.column) for node in parts["nodes"]]
    assert len(set(places)) == len(places)
    for a in parts["nodes"]:
        for b in parts["nodes"]:
            if a.row == b.row and position[a.id] < position[b.id]:
                assert a.column < b.column
    embeddings = sorted((n for n in parts["nodes"] if n.row == 0), key=lambda n: n.column)
    assert [node.label for node in embeddings] == raw["metadata"]["prompt_tokens"]


def test_the_view_is_graph_html_of_its_parts_with_hover_details(raw):
    graph = read_attribution_graph(raw)
    parts = graph._view_parts()
    assert set(parts) == {"nodes", "edges", "title", "row_labels", "description", "note"}
    assert graph_html(**parts) in graph._repr_html_()  # what shows where scripts do not run
    assert len(parts["edges"]) == len(raw["links"])
    feature = next(n for n in raw["nodes"] if n["feature_type"] == "cross layer transcoder")
    title = next(node.title for node in parts["nodes"] if node.id == feature["node_id"])
    assert f"layer {feature['layer']}" in title and f"activation {feature['activation']:.4g}" in title
    assert f"influence {feature['influence']:.4g}" in title
    assert raw["metadata"]["slug"] in parts["title"] and raw["metadata"]["prompt"] in parts["description"]


def test_hostile_clerps_and_prompt_tokens_are_shown_only_escaped(raw):
    hostile = copy.deepcopy(raw)
    hostile["metadata"]["prompt_tokens"][1] = HOSTILE
    hostile["metadata"]["slug"] = HOSTILE
    next(n for n in hostile["nodes"] if n["feature_type"] == "cross layer transcoder")["clerp"] = HOSTILE
    page = read_attribution_graph(hostile)._repr_html_()
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&amp;lt;" not in page  # escaped once, not twice
    assert "<bos>" not in read_attribution_graph(raw)._repr_html_()  # the peer's own "<bos>" token too


def test_large_graphs_draw_the_nodes_on_the_strongest_links_and_say_so():
    tokens = ["a", "b", "c"]
    nodes = [_node(f"E_{p}_{p}", "embedding", "E", p) for p in range(3)]
    nodes += [_node(f"0_{i}_{i % 3}", "cross layer transcoder", "0", i % 3) for i in range(600)]
    nodes.append(_node("2_9_2", "logit", "2", 2, clerp='Output "x" (p=0.900)'))
    links = [{"source": f"E_{i % 3}_{i % 3}", "target": f"0_{i}_{i % 3}", "weight": (i + 1) / 600} for i in range(600)]
    links += [{"source": f"0_{i}_{i % 3}", "target": "2_9_2", "weight": -(i + 1) / 1000} for i in range(600)]
    graph = read_attribution_graph({"metadata": {"prompt_tokens": tokens}, "nodes": nodes, "links": links})
    parts = graph._view_parts()
    strongest = {end for text, _ in graph.top(MAX_EDGES) for end in text.split("->")}
    shown = {node.id for node in parts["nodes"]}
    assert shown == strongest | {"E_0_0", "E_1_1", "E_2_2", "2_9_2"}
    assert all(edge.source in shown and edge.target in shown for edge in parts["edges"])
    assert f"drawn are the {len(shown)} nodes on its {MAX_EDGES} strongest links" in parts["note"]
    page = graph._repr_html_()
    assert page.count("<path") == MAX_EDGES and page.count("<rect") == len(shown)


def test_a_node_id_written_twice_names_the_later_node(raw):
    twice = copy.deepcopy(raw)
    feature = next(n for n in twice["nodes"] if n["feature_type"] == "cross layer transcoder")
    twice["nodes"].append({**feature, "clerp": "the later one"})
    graph = read_attribution_graph(twice)
    assert len(graph.nodes) == len(raw["nodes"]) and graph.repeated == 1
    assert graph.node(feature["node_id"]).clerp == "the later one"
    assert "1 node id(s) written twice" in graph._view_parts()["note"]


def test_repr_is_one_line_with_the_counts(raw):
    text = repr(read_attribution_graph(raw))
    assert "\n" not in text and raw["metadata"]["slug"] in text
    assert f"{len(raw['nodes'])} nodes" in text and f"{len(raw['links'])} links" in text


@pytest.mark.parametrize("key", ["nodes", "links", "metadata"])
def test_a_graph_without_nodes_links_or_metadata_is_refused_by_name(raw, key):
    del raw[key]
    with pytest.raises(InputError, match=f"no '{key}'"):
        read_attribution_graph(raw)


def test_a_link_to_an_unknown_node_is_refused_by_name(raw):
    raw["links"].append({"source": raw["nodes"][0]["node_id"], "target": "9_999_9", "weight": 1.0})
    with pytest.raises(InputError, match="'9_999_9'"):
        read_attribution_graph(raw)


@pytest.mark.parametrize("change, message", [
    (lambda g: g["nodes"][0].pop("ctx_idx"), "no 'ctx_idx'"),
    (lambda g: g["nodes"][0].update(ctx_idx=99), "ctx_idx 99"),
    (lambda g: g["nodes"][-1].update(feature_type="cross layer transcoder", layer="mlp"), "layer 'mlp'"),
    (lambda g: g["links"][0].update(weight="heavy"), "weight 'heavy'"),
    (lambda g: g["metadata"].pop("prompt_tokens"), "prompt_tokens"),
    (lambda g: g.update(nodes={}), "'nodes' must be a list"),
])
def test_malformed_nodes_links_and_metadata_are_refused(raw, change, message):
    change(raw)
    with pytest.raises(InputError, match=message):
        read_attribution_graph(raw)


def test_invalid_json_a_missing_file_and_other_json_are_refused(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"nodes": [', encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        read_attribution_graph(broken)
    with pytest.raises(InputError, match="no attribution graph file"):
        read_attribution_graph(tmp_path / "absent.json")
    other = tmp_path / "list.json"
    other.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="JSON object"):
        read_attribution_graph(other)
    with pytest.raises(InputError, match="got int"):
        read_attribution_graph(3)  # type: ignore[arg-type]


def _node(node_id: str, kind: str, layer: str, position: int, clerp: str = "") -> dict:
    return {"node_id": node_id, "feature": 0, "layer": layer, "ctx_idx": position, "feature_type": kind,
            "jsNodeId": node_id, "clerp": clerp, "influence": 0.5}
