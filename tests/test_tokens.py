"""`to_tokens`, `to_str_tokens` and `to_string`: the tokens `run` feeds the model, as ids and as text, checked
against the tokenizer itself."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import make_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return nm.load(make_model("gpt2"), tokenizer=tokenizer)


def test_to_tokens_are_the_ids_run_feeds_the_model(model, tokenizer):
    ids = model.to_tokens("the cat sat on the mat")
    assert ids.tolist() == [tokenizer("the cat sat on the mat")["input_ids"]]
    assert torch.equal(ids, model.run("the cat sat on the mat").tokens)
    batch = model.to_tokens(["the cat sat", "a dog ran to the park"])
    assert torch.equal(batch, model.run(["the cat sat", "a dog ran to the park"]).tokens)
    assert batch[0, 3:].tolist() == [tokenizer.pad_token_id] * 3


def test_to_tokens_pads_on_the_side_asked(model, tokenizer):
    left = model.to_tokens(["the cat sat", "a dog ran to the park"], padding_side="left")
    assert left[0].tolist() == [tokenizer.pad_token_id] * 3 + tokenizer("the cat sat")["input_ids"]


def test_to_str_tokens_of_text_ids_and_batches(model, tokenizer):
    words = "when mary and john went to the store".split()
    assert model.to_str_tokens(" ".join(words)) == words
    assert model.to_str_tokens(["the cat sat", "a dog"]) == [["the", "cat", "sat"], ["a", "dog"]]  # no padding
    ids = torch.tensor(tokenizer("the cat sat")["input_ids"])
    assert model.to_str_tokens(ids) == ["the", "cat", "sat"]
    assert model.to_str_tokens(ids[None]) == [["the", "cat", "sat"]]
    assert model.to_str_tokens(int(ids[1])) == ["cat"]


def test_to_string_decodes_one_sequence_or_a_batch(model, tokenizer):
    ids = model.to_tokens(["the cat sat", "a dog ran"])
    assert model.to_string(ids[0]) == tokenizer.decode(ids[0].tolist()) == "the cat sat"
    assert model.to_string(ids) == ["the cat sat", "a dog ran"]
    assert model.to_string([3, 4]) == tokenizer.decode([3, 4])


def test_without_a_tokenizer_text_is_refused_and_ids_show_as_numbers():
    model = nm.load(make_model("gpt2"))
    with pytest.raises(nm.InputError, match="needs a tokenizer"):
        model.to_tokens("the cat")
    with pytest.raises(nm.InputError, match="decoding tokens needs a tokenizer"):
        model.to_string([3, 4])
    assert model.to_str_tokens(torch.tensor([3, 4])) == ["3", "4"]
