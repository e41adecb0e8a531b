"""The zoo's `ioi-resid0` SAE: it loads offline, its card is what its recipe measures, and the features the card
names are found again on fresh sentences — by the recipe's own measurement and by a hand count over token strings
with the SAE spliced into the model."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap import zoo
from neuronmap.zoo.recipes import ioi, ioi_sae

FRESH_SEED = 777


@pytest.fixture(scope="module")
def model() -> nm.Model:
    return zoo.load("ioi")


@pytest.fixture(scope="module")
def sae():
    return zoo.load_sae("ioi-resid0")


@pytest.fixture(scope="module")
def card() -> dict:
    return zoo.card("ioi-resid0")


def test_the_shipped_sae_loads_with_its_card(sae, card, model):
    assert sae.cfg.hook_name == card["hook"] == ioi_sae.HOOK and card["model"] == "ioi"
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k) == ("topk", 512, 8)
    assert sae.cfg.d_in == model.run("Mary", capture=ioi_sae.HOOK)[ioi_sae.HOOK].shape[-1]
    assert card["parameters"] == sum(p.numel() for p in sae.parameters())
    entry = zoo.list()["ioi-resid0"]
    assert entry.available and entry.mechanisms == card["mechanisms"] and entry.size_bytes < 1_000_000
    with pytest.raises(nm.LoadError, match="did you mean 'ioi-resid0'"):
        zoo.load_sae("ioi-resid1x")


def test_the_card_metrics_are_what_measure_gives(model, sae, card):
    measured = ioi_sae.measure(model, sae)
    for key, value in card["metrics"].items():
        assert measured["metrics"][key] == pytest.approx(value, abs=2e-4), key
    assert {
        role: found["latent"] for role, found in measured["roles"].items()
    } == {role: found["latent"] for role, found in card["roles"].items()}
    assert card["metrics"]["explained_variance"] > 0.9 and card["metrics"]["ce_loss_recovered"] > 0.95


def test_the_card_states_at_least_two_features(card):
    stated = [role for role, found in card["roles"].items() if found["f1"] >= ioi_sae.STATED_F1]
    assert len(stated) >= 2 and len(card["mechanisms"]) == len(stated)
    for role in stated:
        assert f"latent {card['roles'][role]['latent']}: {ioi_sae.ROLES[role]}" in " ".join(card["mechanisms"])


def test_the_stated_features_are_found_again_on_fresh_sentences(model, sae, card):
    fresh = ioi_sae.role_latents(model, sae, ioi_sae.texts(1000, FRESH_SEED))
    for role, found in card["roles"].items():
        if found["f1"] >= ioi_sae.STATED_F1:
            assert fresh[role]["latent"] == found["latent"], role
            assert fresh[role]["f1"] >= ioi_sae.STATED_F1 - 0.05, (role, fresh[role])


@torch.no_grad()
def test_the_stated_features_by_hand_from_token_strings(model, sae, card):
    """F1 of each stated latent, counted over token strings, its firing read at `hook_sae_acts_post` with the SAE
    spliced in (not through the recipe's code)."""
    hand_roles = {
        "name after and": lambda words, i: words[i] in ioi.NAMES and i > 0 and words[i - 1] == "and",
        "name before and": lambda words, i: words[i] in ioi.NAMES and i + 1 < len(words) and words[i + 1] == "and",
        "to before a name": lambda words, i: words[i] == "to" and i + 1 < len(words) and words[i + 1] in ioi.NAMES,
        "name after to": lambda words, i: words[i] in ioi.NAMES and i > 0 and words[i - 1] == "to",
        "object": lambda words, i: words[i] in ioi.OBJECTS,
        "place": lambda words, i: words[i] in ioi.PLACES,
    }
    stated = {role: found["latent"] for role, found in card["roles"].items() if found["f1"] >= ioi_sae.STATED_F1}
    counts = {role: [0, 0, 0] for role in stated}  # both, latent only, role only
    name = f"{ioi_sae.HOOK}.hook_sae_acts_post"
    for text in ioi_sae.texts(300, FRESH_SEED + 1):
        words = model.to_str_tokens(text)
        acts = model.run(text, saes=[sae], use_error_term=True, capture=name)[name][0]
        for role, latent in stated.items():
            for i in range(len(words)):
                fired, truth = bool(acts[i, latent] > 0), hand_roles[role](words, i)
                counts[role][0] += fired and truth
                counts[role][1] += fired and not truth
                counts[role][2] += truth and not fired
    for role, (both, latent_only, role_only) in counts.items():
        f1 = 2 * both / (2 * both + latent_only + role_only)
        assert f1 >= ioi_sae.STATED_F1 - 0.05, (role, f1)


@pytest.mark.slow
def test_the_quick_recipe_finds_the_answer_slot_feature(tmp_path):
    card = ioi_sae.train(tmp_path, quick=True)
    assert (tmp_path / "cfg.json").exists() and (tmp_path / "sae_weights.safetensors").exists()
    assert card["roles"]["to before a name"]["f1"] >= ioi_sae.STATED_F1
    assert nm.sae.SAE.load(tmp_path).cfg.hook_name == ioi_sae.HOOK
