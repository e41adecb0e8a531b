"""The shipped induction-2l model does what its card says, measured afresh on data the card never saw."""

from __future__ import annotations


import pytest
import torch

import neuronmap as nm
from neuronmap import zoo
from conftest import eager_copy
from neuronmap.zoo.recipes import induction

MODEL_DIR = zoo.path("induction-2l")
FRESH_SEED = 4321  # the card was measured with measure()'s default seed; these tests use other sequences


@pytest.fixture(scope="module")
def card() -> dict:
    return zoo.card("induction-2l")


@pytest.fixture(scope="module")
def model() -> nm.Model:
    return zoo.load("induction-2l")


@pytest.fixture(scope="module")
def fresh(model) -> dict:
    return induction.measure(model, seed=FRESH_SEED)


def _head(entry: dict) -> tuple[int, int]:
    return entry["layer"], entry["head"]


def test_shipped_files_are_a_small_gpt2_with_its_tokenizer(model, card):
    names = {path.name for path in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "card.json"} <= names
    assert sum(path.stat().st_size for path in MODEL_DIR.iterdir()) <= 4 * 2**20
    assert type(model.module).__name__ == card["architecture"] == "GPT2LMHeadModel"
    assert model.module.config.n_layer == 2
    assert card["parameters"] == sum(p.numel() for p in model.module.parameters())


def test_tokenizer_reads_pseudo_words_and_starts_with_bos(model):
    words = induction.vocabulary()[3:8]
    ids = model.tokenizer(" ".join(words))["input_ids"]
    assert ids[0] == induction.BOS
    assert model.tokenizer.convert_ids_to_tokens(ids[1:]) == words


def test_card_recipe_names_the_training_command(card):
    recipe = card["recipe"]
    assert recipe["command"] == "python -m neuronmap.zoo.train induction-2l"
    assert recipe["seed"] == 0 and recipe["steps"] > 0 and recipe["wall_time_s"] > 0


def test_card_mechanisms_are_written_from_its_measured_metrics(card):
    assert card["mechanisms"] == induction.describe(card["metrics"])


def test_measure_is_reproducible_for_a_seed_and_differs_across_seeds(model, fresh):
    assert induction.measure(model, seed=FRESH_SEED) == fresh
    tokens_a, _ = induction._evaluation_batch(FRESH_SEED)
    tokens_b, _ = induction._evaluation_batch(FRESH_SEED + 1)
    assert not torch.equal(tokens_a, tokens_b)


def test_previous_token_heads_named_in_the_card_are_in_layer_0_and_found_again(card, fresh):
    claimed = card["metrics"]["previous_token_heads"]
    assert claimed and all(d["layer"] == 0 for d in claimed)
    assert _head(fresh["previous_token_heads"][0]) == _head(claimed[0])  # the strongest one is the same head
    for layer, head in map(_head, claimed):
        assert fresh["scores"]["previous_token"][layer][head] > induction.PREVIOUS_TOKEN_THRESHOLD


def test_induction_heads_named_in_the_card_are_in_layer_1_and_found_again(card, fresh):
    claimed = card["metrics"]["induction_heads"]
    assert claimed and all(d["layer"] == 1 for d in claimed)
    assert _head(fresh["induction_heads"][0]) == _head(claimed[0])
    for layer, head in map(_head, claimed):
        assert fresh["scores"]["induction"][layer][head] > induction.INDUCTION_THRESHOLD


def test_previous_token_score_is_attention_to_the_token_before(model, fresh):
    tokens, _ = induction._evaluation_batch(FRESH_SEED)
    pattern = model.run(tokens, capture="blocks.0.attn.hook_pattern")["blocks.0.attn.hook_pattern"]
    layer, head = _head(fresh["previous_token_heads"][0])
    n = tokens.shape[1]
    expected = sum(pattern[:, head, i, i - 1].mean().item() for i in range(1, n)) / (n - 1)
    assert fresh["scores"]["previous_token"][layer][head] == pytest.approx(expected, abs=1e-3)


def test_repeated_half_is_predicted_far_better_than_the_first(fresh):
    assert fresh["loss_repeated_half"] < 0.25 * fresh["loss_first_half"]


def test_induction_holds_at_short_and_long_distances_between_copies(model, fresh):
    """A head keyed to a fixed positional offset would score at one distance only; induction must hold at all."""
    tokens, spans = induction._evaluation_batch(FRESH_SEED)
    distances = torch.tensor([second - first for first, second, _ in spans])
    patterns = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    layer, head = _head(fresh["induction_heads"][0])
    for rows in (distances <= distances.median(), distances > distances.median()):
        subset = [span for span, keep in zip(spans, rows) if keep]
        scores = induction._scores_and_losses(model, tokens[rows], subset, patterns, {})
        assert scores["induction"][layer][head] > induction.INDUCTION_THRESHOLD
    assert distances.max() - distances.min() >= 15


def test_ablating_the_previous_token_heads_collapses_induction(card, fresh):
    ablation = fresh["ablation"]
    assert ablation["previous_token_heads"] == [[0, d["head"]] for d in sorted(card["metrics"]["previous_token_heads"], key=lambda d: d["head"])]
    before = ablation["induction_score_before"]
    assert before > induction.INDUCTION_THRESHOLD
    assert ablation["without_previous_token_heads"]["induction_score"] < 0.25 * before
    # without the previous-token heads the repeat is barely easier than the first occurrence
    advantage_before = fresh["loss_first_half"] - fresh["loss_repeated_half"]
    advantage_after = fresh["loss_first_half"] - ablation["without_previous_token_heads"]["loss_repeated_half"]
    assert advantage_after < 0.25 * advantage_before


def test_ablating_the_other_layer0_heads_instead_leaves_induction_standing(fresh):
    ablation = fresh["ablation"]
    assert ablation["control_heads"] and ablation["without_other_layer0_heads"]["induction_score"] > induction.INDUCTION_THRESHOLD


def test_the_previous_token_heads_act_through_layer1_keys(fresh):
    """K-composition: swapping in only the keys computed without the previous-token heads breaks induction."""
    ablation = fresh["ablation"]
    assert ablation["keys_without_previous_token_heads"]["induction_score"] < 0.25 * ablation["induction_score_before"]


def test_key_patch_matches_a_hand_made_one(model, card):
    """The keys-only run is a clean run with layer 1's keys replaced; recompute it with plain torch hooks."""
    tokens, _ = induction._evaluation_batch(FRESH_SEED)
    hf = eager_copy(model.module)  # HF returns attentions from eager attention only
    previous_heads = [d["head"] for d in card["metrics"]["previous_token_heads"]]
    head_dim = hf.config.n_embd // hf.config.n_head

    def zero_heads(module, args):
        merged = args[0].clone()
        for head in previous_heads:
            merged[..., head * head_dim : (head + 1) * head_dim] = 0.0
        return (merged,)

    captured = {}
    handle = hf.transformer.h[0].attn.c_proj.register_forward_pre_hook(zero_heads)
    grab = hf.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, out: captured.setdefault("qkv", out))
    try:
        hf(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
        grab.remove()
    width = hf.config.n_embd

    def keys_from_ablated_run(module, args, out):
        out = out.clone()
        out[..., width : 2 * width] = captured["qkv"][..., width : 2 * width]
        return out

    handle = hf.transformer.h[1].attn.c_attn.register_forward_hook(keys_from_ablated_run)
    try:
        attentions = hf(input_ids=tokens, use_cache=False, output_attentions=True).attentions
    finally:
        handle.remove()
    without_heads = {"blocks.0.attn.hook_z": lambda z, hook: z.index_fill(2, torch.tensor(previous_heads), 0.0)}
    keys = model.run(tokens, capture="blocks.1.attn.hook_k", interventions=without_heads)["blocks.1.attn.hook_k"]
    ours = model.run(tokens, capture="blocks.1.attn.hook_pattern", interventions={"blocks.1.attn.hook_k": keys})
    torch.testing.assert_close(ours["blocks.1.attn.hook_pattern"], attentions[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_quick_recipe_grows_an_induction_head(tmp_path):
    card = induction.train(tmp_path, quick=True, seed=0)
    metrics = card["metrics"]
    assert max(max(row) for row in metrics["scores"]["induction"][1:]) > induction.INDUCTION_THRESHOLD
    assert metrics["previous_token_heads"] and all(d["layer"] == 0 for d in metrics["previous_token_heads"])
    ablation = metrics["ablation"]
    assert ablation["without_previous_token_heads"]["induction_score"] < 0.25 * ablation["induction_score_before"]
    assert (tmp_path / "card.json").exists() and (tmp_path / "model.safetensors").exists()
    assert nm.load(tmp_path).module.config.n_layer == 2
