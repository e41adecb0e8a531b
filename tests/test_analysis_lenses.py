"""The logit lens against the model's own logits and a by-hand final LayerNorm + unembedding; its view and errors."""

from __future__ import annotations

import types

import pytest
import torch
import transformers

import neuronmap as nm
from conftest import config_for, make_model, tokens
from neuronmap.analysis.lenses import logit_lens

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def induction():
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def ioi():
    return nm.load("ioi")


def _by_hand(model, stream: torch.Tensor) -> torch.Tensor:
    """Log-probs of a residual stream `[pos, d_model]` through GPT-2's final LayerNorm and unembedding, by hand."""
    ln = model.module.transformer.ln_f
    x = stream.double()
    x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    x = x * ln.weight.detach().double() + ln.bias.detach().double()
    return (x @ model.module.lm_head.weight.detach().double().T).log_softmax(-1)


@pytest.mark.parametrize("name", ["induction", "ioi"])
def test_the_last_layer_is_the_models_own_output(name, request):
    model = request.getfixturevalue(name)
    prompt = torch.arange(3, 19) if name == "induction" else PROMPT
    lens = logit_lens(model, prompt)
    n_layers = len(model.weights.blocks)
    assert lens.layers == ["embed", *map(str, range(n_layers))]
    logits = model.run(prompt).logits[0].float()
    assert torch.allclose(lens.logprobs[-1], logits.log_softmax(-1), atol=1e-5)
    assert model.list_hooks() == []


def test_intermediate_layers_equal_layernorm_and_unembedding_by_hand(induction):
    ids = torch.tensor([5, 9, 17, 5, 9, 300, 2, 17])
    lens = logit_lens(induction, ids)
    trace = induction.run(ids[None], capture="blocks.0.hook_resid_post")
    assert torch.allclose(lens.logprobs[1].double(), _by_hand(induction, trace["blocks.0.hook_resid_post"][0]), atol=1e-5)
    # The embeddings, from the weights alone: token rows plus position rows.
    embed = induction.module.transformer.wte.weight[ids] + induction.module.transformer.wpe.weight[: len(ids)]
    assert torch.allclose(lens.logprobs[0].double(), _by_hand(induction, embed.detach()), atol=1e-5)


def test_top_tokens_and_logprob_of_read_the_grid(ioi):
    lens = logit_lens(ioi, PROMPT, layers=[1, "embed"], positions=[2, -1], top_k=3)
    assert lens.layers == ["1", "embed"] and lens.positions == [2, 14] and lens.tokens == ["Mary", "to"]
    full = logit_lens(ioi, PROMPT)
    assert torch.allclose(lens.logprobs[0], full.logprobs[2][[2, 14]], atol=1e-6)
    values, ids = full.logprobs[2, 14].topk(3)
    top = lens.top_tokens(1, -1)
    assert [t for t, _ in top] == ioi.to_str_tokens(ids) and top[0][0] == "Mary"
    assert [p for _, p in top] == pytest.approx(values.exp().tolist())
    mary = ioi.tokenizer.encode("Mary", add_special_tokens=False)[0]
    assert torch.equal(lens.logprob_of("Mary"), lens.logprobs[..., mary])
    assert torch.equal(lens.logprob_of(mary), lens.logprobs[..., mary])
    assert torch.allclose(logit_lens(ioi, PROMPT, positions="last").logprobs, full.logprobs[:, -1:], atol=1e-6)
    assert lens.to_numpy().shape == (2, 2, lens.logprobs.shape[-1])


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_rotary_families_last_layer_is_their_output(family):
    model = nm.load(make_model(family))
    ids = tokens(batch=1)
    lens = logit_lens(model, ids)
    assert torch.allclose(lens.logprobs[-1], model.run(ids).logits[0].float().log_softmax(-1), atol=1e-5)


def test_the_view_escapes_tokens_and_shades_cells(ioi):
    lens = logit_lens(ioi, PROMPT, positions=[0, 1])
    lens.tokens = ["<script>alert(1)</script>", "a&b"]
    lens._model = types.SimpleNamespace(tokenizer=object(), to_str_tokens=lambda token: ['<img src=x onerror="x">'])
    page = lens._repr_html_()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "a&amp;b" in page and "&lt;img" in page
    assert page.count("<td ") == len(lens.layers) * 2
    figure = lens.figure()
    assert figure.data[0].z.shape == (len(lens.layers), 2)
    assert all("<img" not in text for row in figure.data[0].text for text in row)


def test_bad_input_raises_neuronmap_errors(induction):
    with pytest.raises(nm.InputError, match="one prompt"):
        logit_lens(induction, tokens(batch=2))
    with pytest.raises(nm.InputError, match="outside the prompt"):
        logit_lens(induction, torch.arange(5), positions=[7])
    with pytest.raises(nm.InputError, match="not a block"):
        logit_lens(induction, torch.arange(5), layers=[2])
    lens = logit_lens(induction, torch.arange(5))
    with pytest.raises(nm.InputError, match="not a token id"):
        lens.logprob_of(10_000)
    with pytest.raises(nm.InputError, match="2 tokens, not one"):
        lens.logprob_of("moki feme")
    with pytest.raises(nm.InputError, match="not in this lens"):
        lens.top_tokens(0, 9)
    bare = nm.load(transformers.GPT2Model(config_for("gpt2")).eval())
    with pytest.raises(nm.WeightError, match="no language-model head"):
        logit_lens(bare, torch.arange(5))
    encoder = nm.load(transformers.BertForMaskedLM(config_for("bert")).eval())
    with pytest.raises(nm.WeightError, match="no final norm"):
        logit_lens(encoder, torch.arange(5))
    with pytest.raises(nm.InputError, match="top_k"):
        logit_lens(induction, torch.arange(5), top_k=0)
    assert induction.list_hooks() == [] and bare.list_hooks() == [] and encoder.list_hooks() == []
