"""Tutorial 02's checkers accept right answers and name what is wrong with wrong ones (on induction-2l)."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.course import ch02


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("induction-2l")


@pytest.fixture(scope="module")
def tokens(model):
    return nm.repeated_random_tokens(model, length=20, batch=4, seed=3)


def test_previous_token_scores(model, tokens, capsys):
    patterns = nm.attention(model, tokens)
    right = torch.stack([patterns[layer].diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)) for layer in patterns.layers])
    assert ch02.check_previous_token_scores(right, model, tokens)
    assert not ch02.check_previous_token_scores(right.T, model, tokens)
    assert "transposed" in capsys.readouterr().out
    diagonal = torch.stack([patterns[layer].diagonal(dim1=-2, dim2=-1).mean(dim=(0, 2)) for layer in patterns.layers])
    assert not ch02.check_previous_token_scores(diagonal, model, tokens)
    assert "attention to itself" in capsys.readouterr().out


def test_strongest_induction_head(model, capsys):
    card = nm.zoo.card("induction-2l")["metrics"]
    best = card["induction_heads"][0]
    assert ch02.check_strongest_induction_head((best["layer"], best["head"]), model)
    previous = card["previous_token_heads"][0]
    assert not ch02.check_strongest_induction_head((previous["layer"], previous["head"]), model)
    assert "attends to the previous token" in capsys.readouterr().out
    assert not ch02.check_strongest_induction_head((5, 0), model)


def test_minimal_ablation(model, capsys):
    heads = sorted(d["head"] for d in nm.zoo.card("induction-2l")["metrics"]["previous_token_heads"])
    assert ch02.check_minimal_ablation(heads, model)
    assert not ch02.check_minimal_ablation(heads[:1], model)  # one previous-token head is not enough
    assert "still scores" in capsys.readouterr().out
    assert not ch02.check_minimal_ablation([0, 1, 2, 3], model)  # works, but is not the smallest set
    assert "smaller set" in capsys.readouterr().out
