"""`capture_positions`: every form keeps exactly what hand indexing of the full activation keeps, with left or
right padding, and a position outside the inputs is an error naming it (never an index that wraps around)."""

from __future__ import annotations

import copy

import pytest
import torch

import neuronmap as nm
from conftest import make_model, word_tokenizer

PROMPTS = ["when mary and john went to the store and a cat sat on the mat", "the cat sat"]  # 15 and 3 tokens
NAMES = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"]


@pytest.fixture(scope="module", params=["right", "left"])
def model(request):
    tokenizer = copy.deepcopy(word_tokenizer())
    tokenizer.padding_side = request.param
    return nm.load(make_model("gpt2"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def full(model):
    return model.run(PROMPTS, capture=NAMES)


def by_hand(full, name: str, index) -> torch.Tensor:
    dim = 2 if name.endswith("hook_pattern") else 1  # patterns are cut along the query dimension
    return full[name][(slice(None),) * dim + (index,)]


@pytest.mark.parametrize(
    "positions, index",
    [
        (0, [0]),
        (14, [14]),
        (-1, [14]),
        (-15, [0]),
        (slice(2, 9, 3), [2, 5, 8]),
        (slice(-4, None), [11, 12, 13, 14]),
        (slice(None, None, -5), [14, 9, 4]),
        (slice(10, 100), [10, 11, 12, 13, 14]),  # a slice clips at the end, as in Python
        ([0, 14, -1, 3], [0, 14, 14, 3]),
        ((2, 2), [2, 2]),
        (torch.tensor([4, -2]), [4, 13]),
        (torch.tensor(6), [6]),
    ],
    ids=str,
)
def test_every_form_keeps_what_hand_indexing_keeps(model, full, positions, index):
    kept = model.run(PROMPTS, capture=NAMES, capture_positions=positions)
    for name in NAMES:
        assert torch.equal(kept[name], by_hand(full, name, index)), name


def test_last_keeps_each_prompts_last_real_token_wherever_padding_puts_it(model, full):
    kept = model.run(PROMPTS, capture=NAMES, capture_positions="last")
    mask = full.attention_mask
    last = [int(row.nonzero().max()) for row in mask]
    assert (last == [14, 14]) if model.tokenizer.padding_side == "left" else (last == [14, 2])
    for row, position in enumerate(last):
        assert torch.equal(kept["blocks.1.hook_resid_post"][row, 0], full["blocks.1.hook_resid_post"][row, position])
        assert torch.equal(kept["blocks.0.attn.hook_pattern"][row, :, 0], full["blocks.0.attn.hook_pattern"][row, :, position])


@pytest.mark.parametrize(
    "positions, message",
    [
        ([0, 200], "capture_positions 200 is out of range: the inputs are 15 tokens long (positions -15 to 14)"),
        ([3, -200], "capture_positions -200 is out of range: the inputs are 15 tokens long"),
        (100, "capture_positions 100 is out of range: the inputs are 15 tokens long"),
        (15, "capture_positions 15 is out of range"),
        (-16, "capture_positions -16 is out of range"),
        (torch.tensor([1, 15]), "capture_positions 15 is out of range"),
        (slice(20, 30), "selects no position of inputs 15 tokens long"),
        (slice(None, None, 0), "step cannot be zero"),
        ([], "empty list"),
        (True, "not booleans"),
        (torch.tensor([True, False]), "not booleans"),
        (torch.tensor([1.0]), "integer tensor"),
        ([1, "2"], "must be an int, a slice, a list of ints"),
        (2.0, "must be an int, a slice, a list of ints"),
    ],
    ids=str,
)
def test_a_position_outside_the_inputs_is_an_error_before_anything_runs(model, positions, message):
    seen = []
    with pytest.raises(nm.InputError, match=_literal(message)):
        model.run(
            PROMPTS,
            capture=NAMES,
            capture_positions=positions,
            interventions={"hook_embed": lambda embed, hook: seen.append(hook)},
        )
    assert seen == [] and model.list_hooks() == []


def test_a_module_without_a_context_length_checks_positions_against_its_activations():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    model = nm.load(module)
    x = torch.randn(2, 5, 3)
    assert torch.equal(model.run(x, capture="0", capture_positions=[4, -5])["0"], module[0](x)[:, [4, 0]].detach())
    with pytest.raises(nm.InputError, match="capture_positions 5 is out of range: the inputs are 5 tokens long"):
        model.run(x, capture="0", capture_positions=5)
    assert model.list_hooks() == []


def _literal(text: str) -> str:
    import re

    return re.escape(text)
