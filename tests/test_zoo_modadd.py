"""The zoo's `modadd` model: a one-layer GPT-2 that has grokked (a + b) mod p, checked from its shipped weights."""

from __future__ import annotations


import pytest
import torch

import neuronmap as nm
from neuronmap import zoo
import neuronmap.zoo.recipes.modadd as modadd

MODEL_DIR = zoo.path("modadd")


@pytest.fixture(scope="module")
def model():
    return zoo.load("modadd")


@pytest.fixture(scope="module")
def card():
    return zoo.card("modadd")


def _pairs(p: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = indices // p, indices % p
    return torch.stack([a, b, torch.full_like(a, p)], dim=-1), (a + b) % p


def _embedding_spectrum(model, p: int) -> torch.Tensor:
    """‖DFT[k]‖² of W_E[:p] along the token axis, for k = 1..(p-1)/2, computed directly."""
    w = model.module.transformer.wte.weight.detach()[:p].double()
    n = torch.arange(p, dtype=torch.float64)
    k = torch.arange(1, (p - 1) // 2 + 1, dtype=torch.float64)
    angle = 2 * torch.pi * k[:, None] * n[None, :] / p
    return (torch.cos(angle) @ w).pow(2).sum(-1) + (torch.sin(angle) @ w).pow(2).sum(-1)


def test_shipped_model_is_a_one_layer_gpt2_under_3mb(model, card):
    assert type(model.module).__name__ == card["architecture"] == "GPT2LMHeadModel"
    assert model.module.config.n_layer == 1
    assert (MODEL_DIR / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file()) <= 3 * 2**20
    assert card["parameters"] == sum(w.numel() for w in model.module.parameters())


def test_generalises_to_held_out_pairs(model):
    task = model.module.config.modadd
    p = task["p"]
    train_idx, test_idx = modadd.split(p, task["train_fraction"], task["split_seed"])
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert len(train_idx) + len(test_idx) == p * p
    tokens, answers = _pairs(p, test_idx)
    predictions = model.run(tokens).logits[:, -1].argmax(-1)
    assert (predictions == answers).float().mean().item() >= 0.99


@pytest.mark.parametrize("prompt, answer", [("3 5 =", "8"), ("100 20 =", "7"), ("112 1 =", "0")])
def test_predicts_the_sum_from_text(model, prompt, answer):
    trace = model.run(prompt)
    assert trace.str_tokens == [prompt.split()]
    assert model.tokenizer.decode([int(trace.logits[0, -1].argmax())]) == answer


def test_card_metrics_are_what_measure_gives(model, card):
    measured = modadd.measure(model)
    assert measured["key_frequencies"] == card["metrics"]["key_frequencies"]
    for key in ("train_accuracy", "test_accuracy", "key_frequency_fraction"):
        assert measured[key] == pytest.approx(card["metrics"][key], abs=1e-3)
    assert card["metrics"]["test_accuracy"] >= 0.99


def test_card_frequencies_carry_most_of_the_embedding_norm(model, card):
    p = model.module.config.modadd["p"]
    energy = _embedding_spectrum(model, p)
    key = card["metrics"]["key_frequencies"]
    top = sorted((energy.argsort(descending=True)[: len(key)] + 1).tolist())
    assert key == top
    share = energy[[k - 1 for k in key]].sum().item() / energy.sum().item()
    assert share == pytest.approx(card["metrics"]["key_frequency_fraction"], abs=1e-3)
    uniform = len(key) / len(energy)
    assert share >= 0.5 and share >= 4 * uniform
    assert any(", ".join(map(str, key)) in line for line in card["mechanisms"])


@pytest.mark.slow
def test_quick_recipe_generalises_above_chance(tmp_path):
    card = modadd.train(tmp_path, quick=True, seed=0)
    p = card["metrics"]["p"]
    assert card["metrics"]["test_accuracy"] >= 0.5 > 10 / p
    reloaded = modadd.measure(nm.load(tmp_path, name="modadd"))
    assert reloaded["test_accuracy"] == pytest.approx(card["metrics"]["test_accuracy"])
    assert (tmp_path / "card.json").exists() and (tmp_path / "model.safetensors").exists()
