"""The zoo's `ioi` model: held-out IOI accuracy, and a card that describes the mechanism measured in the weights."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

import neuronmap as nm
from neuronmap import zoo
import neuronmap.zoo.recipes.ioi as ioi

MODEL_DIR = zoo.path("ioi")
FRESH_SEED = 4321


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return zoo.load("ioi")


@pytest.fixture(scope="module")
def card():
    return zoo.card("ioi")


@pytest.fixture(scope="module")
def fresh(model):
    return ioi.measure(model, seed=FRESH_SEED, n=200)


def test_shipped_files_are_small_and_the_card_is_complete(card, model):
    files = {f.name: f.stat().st_size for f in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "card.json"} <= set(files)
    assert sum(files.values()) <= 4 * 2**20
    assert card["name"] == ioi.NAME == "ioi" and card["architecture"] == type(model.module).__name__ == "GPT2LMHeadModel"
    assert card["parameters"] == sum(p.numel() for p in model.module.parameters())
    assert card["recipe"]["command"] == "python -m neuronmap.zoo.train ioi" and card["recipe"]["steps"] > 0
    assert card["mechanisms"] and all(isinstance(line, str) for line in card["mechanisms"])


def test_heldout_prompts_use_only_unseen_name_pairs_and_templates():
    prompts = ioi.heldout_prompts(300, seed=FRESH_SEED)
    train_pairs = {frozenset(pair) for pair in ioi.TRAIN_PAIRS}
    assert all(p["template"] in ioi.HELDOUT_TEMPLATES and p["template"] not in ioi.TRAIN_TEMPLATES for p in prompts)
    assert all(frozenset((p["io"], p["s"])) not in train_pairs for p in prompts)
    assert {p["order"] for p in prompts} == {"ABBA", "BABA"}
    assert {name for pair in ioi.TRAIN_PAIRS for name in pair} == set(ioi.NAMES)


def test_training_sentences_never_put_a_heldout_pair_together():
    rng = random.Random(0)
    held = {frozenset(pair) for pair in ioi.HELDOUT_PAIRS}
    names = set(ioi.NAMES)
    for _ in range(3000):
        sentence = ioi.training_sentence(rng)
        present = names & set(re.findall(r"\w+", sentence))
        assert len(present) < 2 or frozenset(present) not in held, sentence


def test_heldout_accuracy_is_at_least_95_percent_on_fresh_prompts(fresh):
    assert fresh["seed"] == FRESH_SEED and fresh["n_prompts"] == 200
    assert fresh["accuracy"] >= 0.95
    assert fresh["accuracy_io_over_s"] >= 0.95
    assert fresh["logit_diff"] > 0


def test_accuracy_and_logit_diff_match_a_plain_forward_pass(model, fresh):
    prompts = ioi.heldout_prompts(200, seed=FRESH_SEED)
    tokenizer, hf = model.tokenizer, model.module
    batch = tokenizer([p["prompt"] for p in prompts], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits
    last = batch["attention_mask"].sum(1) - 1
    final = logits[torch.arange(len(prompts)), last]
    name_ids = tokenizer.convert_tokens_to_ids(ioi.NAMES)
    io = torch.tensor(tokenizer.convert_tokens_to_ids([p["io"] for p in prompts]))
    s = torch.tensor(tokenizer.convert_tokens_to_ids([p["s"] for p in prompts]))
    rows = torch.arange(len(prompts))
    best = torch.tensor(name_ids)[final[:, name_ids].argmax(1)]
    assert fresh["accuracy"] == pytest.approx((best == io).float().mean().item())
    assert fresh["logit_diff"] == pytest.approx((final[rows, io] - final[rows, s]).mean().item(), abs=1e-4)


def test_head_ablation_matches_zeroing_the_head_by_hand(model, fresh):
    top = fresh["important_heads"][0]
    layer, head = map(int, top[1:].split("H"))
    prompts = ioi.heldout_prompts(200, seed=FRESH_SEED)
    tokenizer, hf = model.tokenizer, model.module
    batch = tokenizer([p["prompt"] for p in prompts], padding=True, return_tensors="pt")
    d_head = hf.config.n_embd // hf.config.n_head

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = 0
        return (z,)

    handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            logits = hf(**batch).logits
    finally:
        handle.remove()
    rows = torch.arange(len(prompts))
    final = logits[rows, batch["attention_mask"].sum(1) - 1]
    io = torch.tensor(tokenizer.convert_tokens_to_ids([p["io"] for p in prompts]))
    s = torch.tensor(tokenizer.convert_tokens_to_ids([p["s"] for p in prompts]))
    ablated = (final[rows, io] - final[rows, s]).mean().item()
    assert fresh["heads"][top]["ablation_effect"] == pytest.approx(ablated - fresh["logit_diff"], abs=1e-3)


def test_card_names_the_heads_measured_to_matter(card, fresh):
    named = card["metrics"]["important_heads"]
    assert named, "the card names no head"
    assert set(named) == set(fresh["important_heads"])
    text = "\n".join(card["mechanisms"])
    for head in named:
        assert f"{head} matters" in text
    threshold = ioi.IMPORTANT_FRACTION * fresh["logit_diff"]
    for head, numbers in fresh["heads"].items():
        assert (-numbers["ablation_effect"] >= threshold) == (head in named), head


def test_card_says_where_the_important_heads_attend(card, fresh):
    for head in card["metrics"]["important_heads"]:
        numbers = fresh["heads"][head]
        targets = {
            "the IO name": numbers["end_to_io"],
            "the first S name": numbers["end_to_s1"],
            "the second S name": numbers["end_to_s2"],
            "the start token": numbers["end_to_bos"],
            "other tokens": 1 - numbers["end_to_io"] - numbers["end_to_s1"] - numbers["end_to_s2"] - numbers["end_to_bos"],
        }
        line = next(line for line in card["mechanisms"] if line.startswith(f"{head} matters"))
        assert f"attends mostly to {max(targets, key=targets.get)} " in line, (line, targets)


def test_card_name_gathering_heads_attend_to_the_names_afresh(card, fresh):
    for head in card["metrics"]["name_gathering_heads"]:
        numbers = fresh["heads"][head]
        assert numbers["end_to_io"] + numbers["end_to_s1"] + numbers["end_to_s2"] >= ioi.GATHER_ATTENTION, head
        assert head in "\n".join(card["mechanisms"])


def test_card_metrics_are_what_measure_gives(model, card):
    again = ioi.measure(model)  # the card's seed and size
    assert again["accuracy"] == pytest.approx(card["metrics"]["accuracy"])
    assert again["logit_diff"] == pytest.approx(card["metrics"]["logit_diff"], abs=1e-3)
    assert again["important_heads"] == card["metrics"]["important_heads"]
    assert _same_text_to_rounding(ioi.describe(again), card["mechanisms"])


@pytest.mark.slow
def test_quick_training_reaches_heldout_accuracy_well_above_chance(tmp_path):
    card = ioi.train(tmp_path, quick=True, seed=0)
    assert card["recipe"]["quick"] and (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "card.json").read_text())["metrics"]["accuracy"] == card["metrics"]["accuracy"]
    # chance: 1 in 48 names for `accuracy`, one half for IO over S
    assert card["metrics"]["accuracy"] >= 0.5
    assert card["metrics"]["accuracy_io_over_s"] >= 0.8
    assert card["metrics"]["logit_diff"] > 1.0
    reloaded = nm.load(tmp_path, name="ioi")
    assert ioi.measure(reloaded, n=50)["accuracy"] >= 0.5


def _same_text_to_rounding(lines: list[str], expected: list[str]) -> bool:
    number = re.compile(r"[-+]?\d+\.\d+")
    return len(lines) == len(expected) and all(
        number.sub("#", a) == number.sub("#", b)
        and all(abs(float(x) - float(y)) <= 0.011 for x, y in zip(number.findall(a), number.findall(b)))
        for a, b in zip(lines, expected)
    )
