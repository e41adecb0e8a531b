"""Hooks never outlive the run or context that attached them, however it ends."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.hooks import is_neuronmap_hook
from conftest import bare, main_output, make_model, tokens


def _hooks_on(module: torch.nn.Module) -> list:
    found = []
    for sub in module.modules():
        found += list(sub._forward_hooks.values()) + list(sub._forward_pre_hooks.values())
    return found


def _neuronmap_hooks_on(module: torch.nn.Module) -> list:
    return [hook for hook in _hooks_on(module) if is_neuronmap_hook(hook)]


class Boom(Exception):
    pass


def _raise(exception):
    def intervention(activation, hook):
        raise exception

    return intervention


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("exception", [Boom("user error"), KeyboardInterrupt()])
@pytest.mark.parametrize("where", ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_q"])
def test_a_raising_intervention_leaves_no_hook_and_the_next_run_is_bit_identical(family, exception, where):
    hf_model = make_model(family)
    model = nm.load(hf_model)
    with torch.no_grad():
        baseline = main_output(bare(hf_model, tokens()))
    hooks_before = len(_hooks_on(hf_model))
    expected = nm.InterventionError if isinstance(exception, Exception) else type(exception)  # Ctrl-C stays itself
    with pytest.raises(expected) as raised:
        model.run(tokens(), capture="*", interventions={where: _raise(exception)})
    assert raised.value is exception or raised.value.__cause__ is exception
    assert _neuronmap_hooks_on(hf_model) == []
    assert len(_hooks_on(hf_model)) == hooks_before
    assert hf_model.config._attn_implementation == "sdpa"
    assert model.list_hooks() == []
    assert torch.equal(main_output(model.run(tokens()).output), baseline)
    with torch.no_grad():
        assert torch.equal(main_output(bare(hf_model, tokens())), baseline)


def test_a_wrong_shape_is_a_clear_error_and_leaves_no_hook():
    hf_model = make_model("gpt2")
    model = nm.load(hf_model)
    with pytest.raises(nm.InterventionError, match=r"blocks\.0\.hook_resid_post.*shape \[2, 3\].*expected \[2, 9, 32\]"):
        model.run(tokens(), interventions={"blocks.0.hook_resid_post": lambda x, hook: x[:, :3, 0]})
    assert _neuronmap_hooks_on(hf_model) == []


def test_an_exception_inside_the_hooks_context_removes_its_hooks():
    hf_model = make_model("gpt2")
    model = nm.load(hf_model)
    with pytest.raises(Boom):
        with model.hooks(interventions={"blocks.*.attn.hook_pattern": lambda p, hook: p}):
            assert len(_neuronmap_hooks_on(hf_model)) == 0  # attention hooks live in the wrapper, not torch hooks
            assert hf_model.config._attn_implementation != "sdpa"
            raise Boom()
    assert hf_model.config._attn_implementation == "sdpa"
    assert model.list_hooks() == []


def test_nested_contexts_restore_the_attention_setting_only_at_the_end():
    hf_model = make_model("llama")
    model = nm.load(hf_model)
    with model.hooks(interventions={"blocks.0.attn.hook_pattern": lambda p, hook: None}):
        trace = model.run(tokens(), capture="blocks.1.attn.hook_pattern")
        assert "blocks.1.attn.hook_pattern" in trace
        assert hf_model.config._attn_implementation != "sdpa"
    assert hf_model.config._attn_implementation == "sdpa"
