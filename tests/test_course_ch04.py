"""Tutorial 04's checkers: right answers pass, wrong ones get a specific hint without the answer, placeholders say
"not yet", `reveal=True` shows the answer, and each checker's reference equals `nm.circuits` on the same prompts (an
independent computation: the checkers enumerate the graph themselves and compute EAP, EAP-IG and exact edge
patching with plain torch hooks on the HF modules)."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import Graph
from neuronmap.course import ch04
from neuronmap.course.feedback import PLACEHOLDER_HINT
from neuronmap.zoo.recipes import ioi

LENGTH = 12
STEPS = 5
TEMPLATE = "After {A} and {B} arrived at the {place}, {S} threw a {object} to"


@pytest.fixture(scope="module")
def induction():
    """The tutorial's induction setup: (model, clean, corrupt, metric)."""
    model = nm.zoo.load("induction-2l")
    clean = nm.repeated_random_tokens(model, length=LENGTH, seed=0)
    other = nm.repeated_random_tokens(model, length=LENGTH, seed=1)
    corrupt = clean.clone()
    corrupt[:, 1 : LENGTH + 1] = other[:, 1 : LENGTH + 1]

    def repeat_logprob(logits):
        logprobs = logits.log_softmax(-1)[:, LENGTH + 1 : -1]
        return logprobs.gather(-1, clean[:, LENGTH + 2 :, None])[..., 0].mean(-1)

    return model, clean, corrupt, repeat_logprob


@pytest.fixture(scope="module")
def induction_ig(induction):
    return nm.circuits.eap(*induction, steps=STEPS)


@pytest.fixture(scope="module")
def ioi_setup():
    """(model, prompt records, clean texts, corrupted texts, metric), as in the tutorial."""
    model = nm.zoo.load("ioi")
    prompts = [p for p in ioi.heldout_prompts(400, 1234) if p["template"] == TEMPLATE][:16]
    metric = nm.patching.logit_diff([" " + p["io"] for p in prompts], [" " + p["s"] for p in prompts])
    return model, prompts, [p["prompt"] for p in prompts], [ioi.flipped(p) for p in prompts], metric


@pytest.fixture(scope="module")
def ioi_ig(ioi_setup):
    model, _, clean, corrupt, metric = ioi_setup
    return nm.circuits.eap(model, clean, corrupt, metric, steps=STEPS)


def _by_name(scores: nm.circuits.CircuitGraph) -> dict[tuple[str, str], float]:
    g = scores.graph
    return {tuple(name.split("->")): float(scores.scores[g.sender(name.split("->")[0]), g.receiver(name.split("->")[1])])
            for name in g.edge_names()}


def _count_edges(n_layers, n_heads, *, per_head=3, own_mlp=True, embed=1, logits=True, head_to_head=False):
    """A hand-written count, optionally with one of exercise 1's mistakes."""
    total = 0
    for layer in range(n_layers):
        earlier = embed + layer * (n_heads + 1)
        total += per_head * n_heads * (earlier + (n_heads if head_to_head else 0))
        total += earlier + (n_heads if own_mlp else 0)
    return total + (embed + n_layers * (n_heads + 1) if logits else 0)


# exercise 1 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_layers", "n_heads"), [(2, 4), (*ch04.SHAPES[0],), (*ch04.SHAPES[1],), (*ch04.SHAPES[2],)])
def test_the_edge_count_reference_is_nm_circuits_graph(n_layers, n_heads):
    assert len(ch04._edges(n_layers, n_heads)) == Graph(n_layers, n_heads).n_edges == _count_edges(n_layers, n_heads)


def test_a_right_edge_count_passes(induction, capsys):
    model = induction[0]
    assert ch04.check_edge_count(_count_edges, model)
    out = capsys.readouterr().out
    assert out.startswith("✓ Correct: ") and "110 edges for 2 layers × 4 heads" in out and "32,491" in out
    assert nm.circuits.graph(model).n_edges == 110


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        ({"per_head": 1}, "three receivers"),
        ({"own_mlp": False}, "every head feeds the MLP of its own layer too"),
        ({"head_to_head": True}, "do not feed each other"),
        ({"embed": 0}, "the token embeddings are a sender too"),
        ({"logits": False}, "the logits are a receiver too"),
    ],
)
def test_a_count_with_a_usual_mistake_gets_its_hint(mistake, hint, induction, capsys):
    assert not ch04.check_edge_count(lambda n_layers, n_heads: _count_edges(n_layers, n_heads, **mistake), induction[0])
    out = capsys.readouterr().out
    assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "The answer" not in out


def test_other_wrong_counts_get_a_hint(induction, capsys):
    model = induction[0]
    assert not ch04.check_edge_count(lambda n_layers, n_heads: _count_edges(n_layers, n_heads) + 1, model)
    assert "count_edges(2, 4) returned 111" in capsys.readouterr().out
    assert not ch04.check_edge_count(lambda n_layers, n_heads: "110", model)
    assert "should return a whole number" in capsys.readouterr().out
    assert not ch04.check_edge_count(110, model)
    assert "should be the function count_edges(n_layers, n_heads)" in capsys.readouterr().out
    assert ch04.check_edge_count(lambda n_layers, n_heads: float(_count_edges(n_layers, n_heads)), model)  # 110.0 counts
    capsys.readouterr()
    assert not ch04.check_edge_count(110, model, reveal=True)
    assert "The answer: each receiver in layer L reads" in capsys.readouterr().out


# exercise 2 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, STEPS])
def test_the_hand_scores_are_nm_circuits_eap_on_induction(steps, induction):
    model, clean, corrupt, metric = induction
    library = _by_name(nm.circuits.eap(model, clean, corrupt, metric, steps=steps))
    edges = ch04._Edges(model, {"input_ids": clean}, {"input_ids": corrupt}, metric)
    hand = edges.scores(steps)
    assert hand.keys() == library.keys()
    assert max(abs(hand[e] - library[e]) for e in hand) < 1e-5
    assert max(abs(v) for v in hand.values()) > 0.2


def test_the_key_sender_passes_and_is_the_cards_previous_token_head(induction, induction_ig, capsys):
    g = induction_ig.graph
    totals = [sum(float(induction_ig.scores[g.sender(f"A0.{h}"), g.receiver(f"A1.{i}.k")]) for i in range(4)) for h in range(4)]
    best = max(range(4), key=totals.__getitem__)
    assert best == 1  # the card: "previous-token head 0.1 (score 0.80)", the strongest
    assert ch04.check_key_sender((0, best), *induction, steps=STEPS)
    out = capsys.readouterr().out
    assert out.startswith("✓ Correct: ") and f"head 0.1's edges into layer 1's keys total {totals[1]:.1%}" in out
    assert ch04.check_key_sender("A0.1", *induction, steps=STEPS)  # a head's name counts too
    capsys.readouterr()


def test_wrong_key_senders_get_a_hint_not_the_answer(induction, induction_ig, capsys):
    g = induction_ig.graph

    def strongest_into(part):
        totals = [sum(float(induction_ig.scores[g.sender(f"A0.{h}"), g.receiver(f"A1.{i}.{part}")]) for i in range(4))
                  for h in range(4)]
        return max(range(4), key=totals.__getitem__)

    head = strongest_into("q")
    assert head != 1
    assert not ch04.check_key_sender((0, head), *induction, steps=STEPS)
    assert f"head 0.{head} sends the most into layer 1's queries" in capsys.readouterr().out
    for answer, hint in [((1, 2), "the senders asked for are layer-0 heads"), ((0, 7), "there is no head 0.7"),
                         ("previous", "should be a (layer, head) tuple"), ((0, 3), "add up each head's edges")]:
        assert not ch04.check_key_sender(answer, *induction, steps=STEPS)
        out = capsys.readouterr().out
        assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "0.1" not in out
    assert not ch04.check_key_sender((0, 3), *induction, steps=STEPS, reveal=True)
    assert "The answer: (0, 1)" in capsys.readouterr().out


# exercise 3 ------------------------------------------------------------------------------------------------------


def test_the_hand_faithfulness_is_nm_circuits_exact_patching(induction, induction_ig):
    sizes = [1, 10, 19, 30, 110]
    library = induction_ig.faithfulness(sizes, baseline=False).values
    edges = ch04._Edges(induction[0], {"input_ids": induction[1]}, {"input_ids": induction[2]}, induction[3])
    faithfulness = edges.faithfulness_by_size(edges.scores(STEPS))
    assert [faithfulness(k) for k in sizes] == pytest.approx(library, abs=1e-4)
    assert faithfulness(110) == pytest.approx(1.0, abs=1e-5)
    assert edges.faithfulness(set()) == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def smallest(induction_ig):
    curve = induction_ig.faithfulness(range(1, 111), baseline=False)
    k = next(size for size, value in zip(curve.sizes, curve.values) if value >= ch04.FAITHFUL)
    return k, curve.values


def test_the_smallest_faithful_circuit_passes(induction, smallest, capsys):
    k, values = smallest
    assert ch04.check_smallest_circuit(k, *induction, steps=STEPS)
    out = capsys.readouterr().out
    assert out.startswith(f"✓ Correct: the {k} strongest edges are the smallest circuit that reaches 80%")
    assert f"{values[k - 1]:.0%} faithful, while the {k - 1} strongest reach {values[k - 2]:.0%}" in out


def test_wrong_circuit_sizes_get_a_hint_not_the_answer(induction, smallest, capsys):
    k, values = smallest
    larger = next(size for size in range(k + 1, 111) if values[size - 1] >= ch04.FAITHFUL)
    eap = nm.circuits.eap(*induction).faithfulness(range(1, 111), baseline=False)
    by_eap = next(size for size, value in zip(eap.sizes, eap.values) if value >= ch04.FAITHFUL)
    assert by_eap != k
    for answer, hint in [
        (larger, "but a smaller circuit reaches 80% too"),
        (k - 1, f"the {k - 1} strongest edges are only {values[k - 2]:.0%} faithful: below 80%"),
        (by_eap, "that is the smallest circuit by EAP's ranking"),
        (0, "a circuit has between 1 and 110 edges"),
        (19.5, "should be a number of edges, an int"),
    ]:
        assert not ch04.check_smallest_circuit(answer, *induction, steps=STEPS)
        out = capsys.readouterr().out
        assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "The answer" not in out
    assert not ch04.check_smallest_circuit(0, *induction, steps=STEPS, reveal=True)
    assert f"The answer: {k}: the {k} strongest edges are" in capsys.readouterr().out


# exercise 4 ------------------------------------------------------------------------------------------------------


def test_the_hand_scores_are_nm_circuits_eap_on_ioi(ioi_setup, ioi_ig):
    model, prompts = ioi_setup[:2]
    pairs = ch04._Pairs(model, prompts)
    rows = torch.arange(len(prompts))
    edges = ch04._Edges(model, pairs.clean, pairs.corrupt, lambda logits: pairs.diffs(logits[rows, pairs.last]))
    hand, library = edges.scores(STEPS), _by_name(ioi_ig)
    assert max(abs(hand[e] - library[e]) for e in hand) < 1e-5


def test_the_name_movers_input_passes_and_is_nm_circuits_strongest(ioi_setup, ioi_ig, capsys):
    model, prompts = ioi_setup[:2]
    into = [(edge, score) for edge, score in ioi_ig.top(110) if "->A1.2." in edge]
    assert into[0][0] == "MLP 0->A1.2.v"  # what head 1.2 reads at S2: the name that the corruption changes
    for answer in ("MLP 0->A1.2.v", into[0], "mlp0 → A1.2.v"):
        assert ch04.check_name_mover_input(answer, model, prompts, steps=STEPS)
        out = capsys.readouterr().out
        assert out.startswith(f"✓ Correct: MLP 0->A1.2.v is the strongest edge into head 1.2, with {into[0][1]:.0%}")


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ("A1.2->logits", "leaves head 1.2: the question asks for an edge into it"),
        ("MLP 0->A1.2.k", "the right sender, but it reaches head 1.2 more strongly through another of its inputs"),
        ("embed->A1.2.v", "another edge into head 1.2 scores more"),
        ("MLP 0->A1.3.v", "does not reach head 1.2"),
        ("A1.2", "there is no edge 'A1.2' in the graph"),
        ("A1.2->A0.1.k", "there is no edge"),
        (3, "should be an edge's name"),
    ],
)
def test_wrong_name_mover_inputs_get_a_hint_not_the_answer(answer, hint, ioi_setup, capsys):
    model, prompts = ioi_setup[:2]
    assert not ch04.check_name_mover_input(answer, model, prompts, steps=STEPS)
    out = capsys.readouterr().out
    assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "MLP 0->A1.2.v" not in out
    assert not ch04.check_name_mover_input(answer, model, prompts, steps=STEPS, reveal=True)
    assert "The answer: MLP 0->A1.2.v" in capsys.readouterr().out


# placeholders ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calls(induction, ioi_setup):
    """Each checker as a function of (answer, reveal)."""
    model, prompts = ioi_setup[:2]
    return {
        "check_edge_count": lambda answer, reveal: ch04.check_edge_count(answer, induction[0], reveal=reveal),
        "check_key_sender": lambda answer, reveal: ch04.check_key_sender(answer, *induction, steps=STEPS, reveal=reveal),
        "check_smallest_circuit": lambda answer, reveal: ch04.check_smallest_circuit(answer, *induction, steps=STEPS,
                                                                                      reveal=reveal),
        "check_name_mover_input": lambda answer, reveal: ch04.check_name_mover_input(answer, model, prompts, steps=STEPS,
                                                                                      reveal=reveal),
    }


@pytest.mark.parametrize("placeholder", [..., None])
@pytest.mark.parametrize("check", ["check_edge_count", "check_key_sender", "check_smallest_circuit", "check_name_mover_input"])
def test_a_placeholder_answer_is_not_yet_started(check, placeholder, calls, capsys):
    assert calls[check](placeholder, False) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}") and out.count("\n") == 1
    assert calls[check](placeholder, True) is False
    assert "The answer: " in capsys.readouterr().out


def test_a_count_whose_body_is_still_the_placeholder_is_not_yet_started(induction, capsys):
    def count_edges(n_layers, n_heads):
        ...  # YOUR ANSWER

    assert ch04.check_edge_count(count_edges, induction[0]) is False
    assert capsys.readouterr().out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}")


def test_the_checkers_leave_no_hook_on_the_models(induction, ioi_setup, capsys):
    def hooks():
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for model in (induction[0], ioi_setup[0])
                for m in model.module.modules()]

    before = hooks()
    assert ch04.check_key_sender((0, 1), *induction, steps=1)
    assert not ch04.check_name_mover_input("A1.2->logits", *ioi_setup[:2], steps=1)
    capsys.readouterr()
    assert hooks() == before
