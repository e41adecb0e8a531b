"""The computational graph (counted by hand, and against auto-circuit's published count for GPT-2 small) and the
`CircuitGraph` result: strongest edges, JSON round trip, escaping, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import CircuitGraph, Graph, eap, graph
from conftest import make_model, tokens


def test_gpt2_small_has_auto_circuits_32491_edges_with_qkv_separate():
    g = Graph(12, 12)  # GPT-2 small: 12 layers of 12 heads
    assert (len(g.senders), len(g.receivers), g.n_edges) == (1 + 12 * 13, 12 * (3 * 12 + 1) + 1, 32_491)
    merged = Graph(12, 12, qkv=False)
    # by hand: a head in layer L reads the embeddings and the 13 components of each earlier layer; an MLP those and
    # its own layer's 12 heads; the logits everything
    by_hand = sum(12 * (1 + 13 * layer) + (1 + 13 * layer + 12) for layer in range(12)) + 1 + 12 * 13
    assert merged.n_edges == by_hand
    assert Graph(12, 12, positions=20).n_edges == 32_491 * 20


def test_edges_join_earlier_senders_to_later_receivers_and_parallel_blocks_drop_head_to_mlp():
    g = Graph(2, 2)
    edges = set(g.edge_names())
    assert {"embed->A0.0.q", "A0.1->A1.0.k", "A0.0->MLP 0", "MLP 0->A1.1.v", "MLP 1->logits"} <= edges
    assert not {"A0.0->A0.1.q", "A1.0->A1.1.k", "MLP 0->MLP 0", "A1.0->A0.0.q", "MLP 0->A0.1.q"} & edges
    parallel = set(Graph(2, 2, parallel=True).edge_names())
    assert edges - parallel == {f"A{layer}.{head}->MLP {layer}" for layer in range(2) for head in range(2)}


def test_the_graph_of_a_model_reads_its_shape_and_grouped_query_attention():
    neox = graph(nm.load(make_model("gpt_neox")))
    assert neox.parallel and neox.n_layers == 2 and neox.n_heads == 4
    assert not graph(nm.load(make_model("gpt_neox_sequential"))).parallel
    llama = graph(nm.load(make_model("llama")))  # 4 query heads sharing 2 key/value heads
    assert [r.name for r in llama.receivers[:8]] == ["A0.0.q", "A0.1.q", "A0.2.q", "A0.3.q", "A0.0.k", "A0.1.k", "A0.0.v", "A0.1.v"]
    assert f"{llama.n_edges:,} edges" in repr(llama) and "q/k/v separate" in repr(llama)
    with pytest.raises(nm.InputError, match="grouped-query attention"):
        graph(nm.load(make_model("llama")), qkv=False)


def _answers(logits):
    return logits[:, -1, 5] - logits[:, -1, 7]


def _pair():
    clean = tokens(2, 6, seed=2)
    corrupt = clean.clone()
    corrupt[:, 1] = tokens(2, 1, seed=3)[:, 0]
    return clean, corrupt


def test_scores_are_normalised_by_the_clean_minus_corrupted_difference_and_top_ranks_by_magnitude():
    model = nm.load(make_model("gpt2"))
    result = eap(model, *_pair(), _answers)
    assert torch.allclose(result.scores, result.raw / (result.clean - result.corrupt))
    top = result.top(5)
    magnitudes = [abs(score) for _, score in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    g = result.graph
    best = max(((s, r) for s, r in g.valid.nonzero().tolist()), key=lambda e: abs(float(result.scores[e[0], e[1]])))
    assert top[0] == (f"{g.senders[best[0]].name}->{g.receivers[best[1]].name}", pytest.approx(float(result.scores[best])))
    assert len(result.top(10_000)) == g.n_edges  # never a non-edge
    assert "EAP" in repr(result) and f"{g.n_edges:,} edges" in repr(result)


def test_per_position_edges_are_named_with_their_position():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _pair()
    result = eap(model, clean, corrupt, _answers, per_position=True, steps=2)
    assert result.scores.shape == (clean.shape[1], *result.graph.valid.shape) and result.method == "EAP-IG (2 steps)"
    assert all("@" in name for name, _ in result.top(5))


@pytest.mark.parametrize("per_position", [False, True])
def test_json_round_trips_every_edge_score(per_position):
    model = nm.load(make_model("gpt2"))
    result = eap(model, *_pair(), _answers, per_position=per_position)
    text = result.to_json()
    data = json.loads(text)
    assert data["schema"] == "neuronmap.circuit_graph/1" and len(data["edges"]) == int(result.graph.valid.sum())
    back = CircuitGraph.from_json(text)
    assert torch.allclose(back.raw, result.raw) and back.top(5) == result.top(5) and back.labels == result.labels
    with pytest.raises(nm.InputError, match="schema"):
        CircuitGraph.from_json(json.dumps({"schema": "something else"}))


def test_the_view_escapes_hostile_labels():
    model = nm.load(make_model("gpt2"))
    result = eap(model, *_pair(), _answers)
    result.method = "<script>alert(1)</script>"
    page = result._repr_html_()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page  # the page's own scripts aside


def test_bad_input_is_a_clear_error_and_leaves_no_hook():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _pair()
    with pytest.raises(nm.InputError, match="2 clean prompts but 1"):
        eap(model, clean, corrupt[:1], _answers)
    with pytest.raises(nm.InputError, match="no gradient"):
        eap(model, clean, corrupt, lambda logits: logits[:, -1].argmax(-1).float())
    with pytest.raises(nm.InputError, match="steps"):
        eap(model, clean, corrupt, _answers, steps=0)
    with pytest.raises(nm.InputError, match="no difference"):
        eap(model, clean, clean, _answers)
    with pytest.raises(nm.InputError, match="pre-norm decoder"):
        eap(nm.load(make_model("bert")), clean, corrupt, _answers)
    assert model.list_hooks() == []
    assert all(p.requires_grad for p in model.module.parameters())
    with pytest.raises(nm.InputError, match="not a sender"):
        graph(model).sender("A9.9")



def test_networkx_holds_every_edge_with_its_score_and_the_figure_is_the_faithfulness_curve():
    model = nm.load(make_model("gpt2"))
    result = eap(model, *_pair(), _answers)
    chosen = result.select(k=5, pruned=False)
    exported = chosen.to_networkx()
    g = result.graph
    assert exported.number_of_edges() == g.n_edges and exported.number_of_nodes() == len(g.nodes)
    for name, score in result.top(5):
        sender, receiver = name.split("->")
        node, port = receiver.rsplit(".", 1) if receiver.count(".") == 2 else (receiver, "in")  # "A1.2.k", "MLP 1"
        data = exported.get_edge_data(sender, node, key=port)
        assert data["score"] == pytest.approx(score) and data["in_circuit"]
    assert sum(d["in_circuit"] for *_, d in exported.edges(data=True)) == 5
    figure = result.figure()
    assert result.curve is not None and list(figure.data[0].y) == result.curve.values
