"""Bad input gets a NeuronMap exception that names the problem, before anything is attached."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import make_model, tokens


@pytest.fixture(scope="module")
def model(tokenizer):
    return nm.load(make_model("gpt2"), tokenizer=tokenizer)


def test_unknown_hook_name_suggests_the_closest(model):
    with pytest.raises(nm.HookNameError, match=r"'blocks\.0\.hook_resid_pots'.*did you mean 'blocks\.0\.hook_resid_post'"):
        model.run(tokens(), capture="blocks.0.hook_resid_pots")


def test_unknown_intervention_name_is_the_same_error(model):
    with pytest.raises(nm.HookNameError, match="did you mean"):
        model.run(tokens(), interventions={"blocks.9.hook_resid_post": torch.zeros(())})


def test_a_pattern_matching_nothing_says_so(model):
    with pytest.raises(nm.HookNameError, match=r"pattern 'blocks\.\*\.hook_nothing' matches no hook point"):
        model.run(tokens(), capture="blocks.*.hook_nothing")


def test_hook_name_errors_are_also_key_errors(model):
    with pytest.raises(KeyError):
        model.run(tokens(), capture="nope")


@pytest.mark.parametrize("empty", ["", [], torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)])
def test_empty_input(model, empty):
    with pytest.raises(nm.InputError, match="empty"):
        model.run(empty)


def test_input_longer_than_the_context(model):
    with pytest.raises(nm.InputError, match="65 tokens long but the model's context is 64"):
        model.run(torch.zeros(1, 65, dtype=torch.long))


def test_strings_without_a_tokenizer():
    with pytest.raises(nm.InputError, match="tokenizer"):
        nm.load(make_model("gpt2")).run("the cat sat")


def test_float_tokens(model):
    with pytest.raises(nm.InputError, match="integers"):
        model.run(torch.zeros(1, 4))


def test_an_intervention_that_is_neither_function_nor_tensor(model):
    with pytest.raises(nm.InterventionError, match="must be a function"):
        model.run(tokens(), interventions={"blocks.0.hook_resid_post": 3.0})


def test_an_intervention_returning_a_non_tensor(model):
    with pytest.raises(nm.InterventionError, match="returned list"):
        model.run(tokens(), interventions={"blocks.0.hook_resid_post": lambda x, hook: [1]})


def test_unknown_capture_positions(model):
    with pytest.raises(nm.InputError, match="did you mean 'last'"):
        model.run(tokens(), capture="hook_embed", capture_positions="first")


def test_load_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(nm.LoadError, match="int"):
        nm.load(12)
    with pytest.raises(nm.LoadError, match="does not exist"):
        nm.load(tmp_path / "missing")


def test_token_ids_outside_the_vocabulary_name_the_id_and_the_range(model):
    vocab = model.module.config.vocab_size
    ids = tokens()
    ids[1, 4] = vocab
    with pytest.raises(nm.InputError, match=rf"token id {vocab} at \[1, 4\] is outside the model's vocabulary: ids run from 0 to {vocab - 1}"):
        model.run(ids)
    with pytest.raises(nm.InputError, match="token id -1 at"):
        model.run(torch.tensor([[3, -1, 4]]))
    assert model.list_hooks() == []


def test_an_intervention_that_raises_is_an_intervention_error_naming_the_hook_point(model):
    def broken(resid, hook):
        return resid * (1 / 0)

    with pytest.raises(nm.InterventionError, match=r"broken.* on 'blocks\.0\.hook_resid_post' raised ZeroDivisionError") as raised:
        model.run(tokens(), interventions={"blocks.0.hook_resid_post": broken})
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
    assert model.list_hooks() == []


def test_a_one_argument_intervention_is_refused_before_the_run(model):
    calls = []

    def one_argument(resid):
        calls.append(resid)

    with pytest.raises(nm.InterventionError, match=r"one_argument on 'blocks\.0\.hook_resid_post' must accept two arguments, fn\(activation, hook\)"):
        model.run(tokens(), interventions={"blocks.0.hook_resid_post": one_argument})
    assert calls == [] and model.list_hooks() == []


def test_an_intervention_taking_the_hook_by_keyword_or_extra_defaults_is_accepted(model):
    def flexible(resid, hook=None, scale=1.0):
        return resid * scale

    model.run(tokens(), interventions={"blocks.0.hook_resid_post": flexible})
    model.run(tokens(), interventions={"blocks.0.hook_resid_post": lambda *args: None})


def test_all_errors_share_one_base(model):
    for error in (nm.HookNameError, nm.InputError, nm.InterventionError, nm.LoadError):
        assert issubclass(error, nm.NeuronMapError)
