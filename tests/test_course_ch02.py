"""Tutorial 02's checkers accept right answers, hint at what is wrong with wrong ones, reveal the answer only when
asked, and print the same scores NeuronMap measures on the same tokens (on induction-2l)."""

from __future__ import annotations

import re

import pytest
import torch

import neuronmap as nm
from neuronmap.course import ch02
from neuronmap.course.feedback import PLACEHOLDER_HINT


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("induction-2l")


@pytest.fixture(scope="module")
def tokens(model):
    return nm.repeated_random_tokens(model, length=20, batch=4, seed=3)


@pytest.fixture(scope="module")
def induction(model, tokens):
    return nm.head_scores(model, "induction", tokens)


@pytest.fixture(scope="module")
def previous_token_heads():
    return sorted(d["head"] for d in nm.zoo.card("induction-2l")["metrics"]["previous_token_heads"])


def _scores(line: str) -> list[float]:
    return [float(number) for number in re.findall(r"\b\d\.\d\d\b", line)]


def test_previous_token_scores(model, tokens, capsys):
    patterns = nm.attention(model, tokens)
    right = torch.stack([patterns[layer].diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)) for layer in patterns.layers])
    assert ch02.check_previous_token_scores(right, model, tokens)
    assert f"({right.max():.2f})" in capsys.readouterr().out
    assert not ch02.check_previous_token_scores(right.T, model, tokens)
    assert "transposed" in capsys.readouterr().out
    diagonal = torch.stack([patterns[layer].diagonal(dim1=-2, dim2=-1).mean(dim=(0, 2)) for layer in patterns.layers])
    assert not ch02.check_previous_token_scores(diagonal, model, tokens)
    assert "attention to itself" in capsys.readouterr().out


def test_strongest_induction_head_reports_neuronmaps_score_on_the_same_tokens(model, tokens, induction, capsys):
    layer, head, score = induction.top(1)[0]
    assert ch02.check_strongest_induction_head((layer, head), model, tokens)
    assert f"head {layer}.{head} is the strongest induction head" in capsys.readouterr().out
    assert not ch02.check_strongest_induction_head((0, 0), model, tokens, reveal=True)
    revealed = capsys.readouterr().out.split("The answer:")[1]
    assert f"head {layer}.{head}" in revealed and _scores(revealed)[0] == pytest.approx(score, abs=0.005)


def test_a_wrong_induction_head_gets_a_hint_not_the_answer(model, tokens, induction, previous_token_heads, capsys):
    layer, head, _ = induction.top(1)[0]
    assert not ch02.check_strongest_induction_head((0, previous_token_heads[0]), model, tokens)
    hint = capsys.readouterr().out
    assert "attends to the previous token" in hint and "reveal=True" in hint
    assert f"{layer}.{head}" not in hint
    assert not ch02.check_strongest_induction_head((0, previous_token_heads[0]), model, tokens, reveal=True)
    assert f"The answer: head {layer}.{head}" in capsys.readouterr().out
    assert not ch02.check_strongest_induction_head((5, 0), model, tokens)
    assert "there is no head 5.0" in capsys.readouterr().out


def test_minimal_ablation_reports_neuronmaps_scores_on_the_same_tokens(model, tokens, induction, previous_token_heads, capsys):
    layer, head, clean = induction.top(1)[0]

    def zero(z, hook):
        z[:, :, previous_token_heads] = 0.0

    with model.hooks({"blocks.0.attn.hook_z": zero}):
        ablated = nm.head_scores(model, "induction", tokens)[layer, head]
    assert ch02.check_minimal_ablation(previous_token_heads, model, tokens)
    line = capsys.readouterr().out
    assert f"induction head {layer}.{head} from" in line
    assert _scores(line) == pytest.approx([clean, ablated], abs=0.005)


def test_a_wrong_ablation_gets_a_hint_not_the_answer(model, tokens, previous_token_heads, capsys):
    assert not ch02.check_minimal_ablation(previous_token_heads[:1], model, tokens)  # one previous-token head is not enough
    assert "still scores" in capsys.readouterr().out
    assert not ch02.check_minimal_ablation([0, 1, 2, 3], model, tokens)  # works, but is not the smallest set
    hint = capsys.readouterr().out
    assert f"a smaller set does too: try sets of {len(previous_token_heads)} heads" in hint
    assert str(previous_token_heads) not in hint
    assert not ch02.check_minimal_ablation([0, 1, 2, 3], model, tokens, reveal=True)
    assert f"The answer: {previous_token_heads}" in capsys.readouterr().out


@pytest.mark.parametrize("placeholder", [..., None])
@pytest.mark.parametrize(
    "check", [ch02.check_previous_token_scores, ch02.check_strongest_induction_head, ch02.check_minimal_ablation], ids=lambda f: f.__name__
)
def test_a_placeholder_answer_is_not_yet_started(check, placeholder, model, tokens, capsys):
    assert check(placeholder, model, tokens) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}") and out.count("\n") == 1
    assert check(placeholder, model, tokens, reveal=True) is False
    assert "The answer: " in capsys.readouterr().out
