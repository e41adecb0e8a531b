"""Direct logit attribution: its terms sum to the clean logit (difference); a head's term by hand; view and errors."""

from __future__ import annotations

import pytest
import torch
import transformers

import neuronmap as nm
from conftest import config_for, make_model, tokens
from neuronmap.analysis.attribution import direct_logit_attribution
from neuronmap.zoo.recipes.ioi import heldout_prompts


@pytest.fixture(scope="module")
def induction():
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def ioi():
    return nm.load("ioi")


def test_the_terms_sum_to_the_clean_logit_on_induction(induction):
    ids = torch.tensor([[7, 40, 300, 12, 7, 40, 300, 12, 7]])
    logits = induction.run(ids).logits[0].double()
    for position, answer in ((-1, 40), (4, 12), (2, 511)):
        result = direct_logit_attribution(induction, ids, answer, position=position)
        assert result.logit == pytest.approx(float(logits[position, answer]), abs=1e-6)
        assert float(result.values.double().sum()) == pytest.approx(result.logit, abs=1e-4)
    assert result.labels[:2] == ["embed", "pos_embed"] and result.labels[-2:] == ["ln_final bias", "unembed bias"]
    assert len(result.labels) == 2 + 2 * (4 + 2) + 2
    assert induction.list_hooks() == []


def test_the_terms_sum_to_the_ioi_logit_difference(ioi):
    for example in heldout_prompts(6):
        result = direct_logit_attribution(ioi, example["prompt"], example["io"], wrong=example["s"], position="last")
        logits = ioi.run(example["prompt"]).logits[0, -1].double()
        io, s = (ioi.tokenizer.encode(name, add_special_tokens=False)[0] for name in (example["io"], example["s"]))
        assert result.logit == pytest.approx(float(logits[io] - logits[s]), abs=1e-5)
        assert float(result.values.double().sum()) == pytest.approx(result.logit, abs=1e-4)
        assert result.logit > 0  # the trained model prefers the indirect object


def test_a_heads_term_is_its_result_through_the_frozen_layernorm_by_hand(ioi):
    example = heldout_prompts(1)[0]
    result = direct_logit_attribution(ioi, example["prompt"], example["io"], wrong=example["s"])
    trace = ioi.run(example["prompt"], capture=["blocks.1.attn.hook_result", "blocks.1.hook_resid_post"])
    stream = trace["blocks.1.hook_resid_post"][0, -1].double()
    ln = ioi.module.transformer.ln_f
    scale = (stream.var(unbiased=False) + ln.eps).sqrt()  # the clean run's final LayerNorm scale
    io, s = (ioi.tokenizer.encode(name, add_special_tokens=False)[0] for name in (example["io"], example["s"]))
    unembed = ioi.module.lm_head.weight.detach().double()
    direction = unembed[io] - unembed[s]
    for head in range(4):
        out = trace["blocks.1.attn.hook_result"][0, -1, head].double()
        expected = ((out - out.mean()) / scale * ln.weight.detach().double()) @ direction
        assert float(result.values[result.labels.index(f"L1H{head}")]) == pytest.approx(float(expected), abs=1e-5)
        assert float(result.heads[1, head]) == float(result.values[result.labels.index(f"L1H{head}")])
    assert float(result.values[result.labels.index("ln_final bias")]) == pytest.approx(float(ln.bias.detach().double() @ direction), abs=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_rotary_families_have_no_position_term_and_still_sum(family):
    model = nm.load(make_model(family))
    ids = tokens(batch=1)
    result = direct_logit_attribution(model, ids, 3, wrong=11, position=4)
    logits = model.run(ids).logits[0, 4].double()
    assert result.logit == pytest.approx(float(logits[3] - logits[11]), abs=1e-4)
    assert float(result.values.double().sum()) == pytest.approx(result.logit, abs=1e-4 * max(1.0, abs(result.logit)))
    assert "pos_embed" not in result.labels


def test_top_numpy_and_views(ioi):
    example = heldout_prompts(1)[0]
    result = direct_logit_attribution(ioi, example["prompt"], example["io"], wrong=example["s"])
    top = result.top(4)
    assert [abs(v) for _, v in top] == sorted((abs(v) for v in result.values.tolist()), reverse=True)[:4]
    assert top[0][1] == float(result.values[result.labels.index(top[0][0])])
    assert result.to_numpy().shape == (len(result.labels),)
    result.description = "<script>x</script>"
    page = result._repr_html_()
    assert "<script>x" not in page and "&lt;script&gt;" in page
    assert "ln_final bias" in page and "L1 mlp" in page
    figure = result.figure()
    assert figure.data[0].z.shape == (2, 4)


def test_bad_input_raises_neuronmap_errors(induction, ioi):
    ids = torch.arange(6)
    with pytest.raises(nm.InputError, match="2 tokens, not one"):
        direct_logit_attribution(induction, ids, "moki feme")
    with pytest.raises(nm.InputError, match="not a token id"):
        direct_logit_attribution(induction, ids, 512)
    with pytest.raises(nm.InputError, match="not a token id"):
        direct_logit_attribution(induction, ids, 3, wrong=-1)
    with pytest.raises(nm.InputError, match="outside the prompt"):
        direct_logit_attribution(induction, ids, 3, position=6)
    with pytest.raises(nm.InputError, match="one token index"):
        direct_logit_attribution(induction, ids, 3, position=[1, 2])
    with pytest.raises(nm.InputError, match="one prompt"):
        direct_logit_attribution(ioi, ["a b", "c d"], "Mary")
    bare = nm.load(transformers.GPT2Model(config_for("gpt2")).eval())
    with pytest.raises(nm.WeightError, match="no language-model head"):
        direct_logit_attribution(bare, ids, 3)
    encoder = nm.load(transformers.BertForMaskedLM(config_for("bert")).eval())
    with pytest.raises(nm.WeightError, match="no final norm"):
        direct_logit_attribution(encoder, ids, 3)
    assert induction.list_hooks() == [] and ioi.list_hooks() == [] and bare.list_hooks() == []


@pytest.mark.parametrize("family", ["ioi", "llama"])  # llama: grouped-query attention, 2 key-value heads for 4
def test_per_position_terms_sum_to_each_heads_term(family, ioi):
    model = ioi if family == "ioi" else nm.load(make_model(family))
    prompt = heldout_prompts(1)[0]["prompt"] if family == "ioi" else tokens(batch=1)
    result = direct_logit_attribution(model, prompt, 3, wrong=5, position=-2, per_position=True)
    plain = direct_logit_attribution(model, prompt, 3, wrong=5, position=-2)
    assert torch.allclose(result.values, plain.values)  # asking for the split changes nothing else
    n_layers, n_heads = plain.heads.shape
    assert result.head_positions.shape == (n_layers, n_heads, len(result.tokens))
    # The split sums to each head's term, which the model computes itself (hook_result); causal: none from the future.
    assert torch.allclose(result.head_positions.sum(-1), plain.heads, atol=1e-5)
    assert torch.all(result.head_positions[..., -1] == 0)
    assert plain.head_positions is None
    assert "each head&#x27;s term by source position" in result._repr_html_()
