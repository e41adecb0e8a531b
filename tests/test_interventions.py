"""Interventions against hand-written torch hooks and hand computation."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import ENCODERS, FAMILIES, bare, main_output, make_model, output_projection, tokens

LAYER, HEAD = 1, 2


def test_zeroing_a_head_in_hook_z_equals_zeroing_its_slice_of_the_output_projection_input(hf_model, family):
    d_head = hf_model.config.hidden_size // hf_model.config.num_attention_heads

    def zero_slice(module, args):
        features = args[0].clone()
        features[..., HEAD * d_head : (HEAD + 1) * d_head] = 0
        return (features,)

    handle = output_projection(hf_model, family, LAYER).register_forward_pre_hook(zero_slice)
    try:
        with torch.no_grad():
            expected = main_output(bare(hf_model, tokens()))
    finally:
        handle.remove()

    def zero_head(z, hook):
        z[:, :, HEAD] = 0

    trace = nm.load(hf_model).run(tokens(), interventions={f"blocks.{LAYER}.attn.hook_z": zero_head})
    assert torch.equal(main_output(trace.output), expected)
    assert not torch.equal(expected, main_output(bare(hf_model, tokens())))  # the ablation did change something


def test_replacing_resid_post_with_another_runs_value_patches_exactly(hf_model):
    model = nm.load(hf_model)
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    name = "blocks.0.hook_resid_post"
    clean_trace = model.run(clean, capture=name)
    patched = model.run(corrupt, interventions={name: clean_trace[name]}, capture=name)
    assert torch.equal(patched[name], clean_trace[name])
    assert torch.equal(main_output(patched.output), main_output(clean_trace.output))


@pytest.mark.parametrize("causal_family", [f for f in FAMILIES if f not in ENCODERS])
def test_patching_one_position_leaves_earlier_positions_of_causal_models_alone(causal_family):
    model = nm.load(make_model(causal_family))
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    name, position = "blocks.0.hook_resid_post", 5
    clean_value = model.run(clean, capture=name)[name]

    def patch(resid, hook):
        resid[:, position] = clean_value[:, position]

    base = model.run(corrupt).logits
    patched = model.run(corrupt, interventions={name: patch}).logits
    assert torch.equal(patched[:, :position], base[:, :position])
    assert not torch.allclose(patched[:, position:], base[:, position:])


def test_a_one_hot_pattern_makes_every_position_read_the_first_value(hf_model):
    """Hand computation: if every query attends only to key 0, z at every position is v at position 0."""

    def attend_to_first(pattern, hook):
        one_hot = torch.zeros_like(pattern)
        one_hot[..., 0] = 1
        return one_hot

    name = f"blocks.{LAYER}.attn"
    trace = nm.load(hf_model).run(
        tokens(), interventions={f"{name}.hook_pattern": attend_to_first}, capture=[f"{name}.hook_v", f"{name}.hook_z", f"{name}.hook_pattern"]
    )
    z, v = trace[f"{name}.hook_z"], trace[f"{name}.hook_v"]
    v = v.repeat_interleave(z.shape[2] // v.shape[2], dim=2)
    torch.testing.assert_close(z, v[:, :1].expand_as(z), rtol=0, atol=1e-6)
    assert torch.equal(trace[f"{name}.hook_pattern"][..., 0], torch.ones_like(trace[f"{name}.hook_pattern"][..., 0]))


def test_zero_queries_give_uniform_attention_over_visible_keys(hf_model, family):
    trace = nm.load(hf_model).run(
        tokens(), interventions={"blocks.0.attn.hook_q": torch.zeros(())}, capture="blocks.0.attn.hook_pattern"
    )
    pattern = trace["blocks.0.attn.hook_pattern"]
    n = pattern.shape[-1]
    if family in ENCODERS:
        expected = torch.full_like(pattern, 1 / n)
    else:
        expected = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).unsqueeze(1)
        expected = expected.expand_as(pattern)
    torch.testing.assert_close(pattern, expected, rtol=0, atol=1e-6)


def test_scores_interventions_flow_through_the_softmax(hf_model):
    def block_key_zero(scores, hook):
        scores[..., 1:, 0] = torch.finfo(scores.dtype).min

    trace = nm.load(hf_model).run(
        tokens(), interventions={"blocks.0.attn.hook_attn_scores": block_key_zero}, capture="blocks.0.attn.hook_pattern"
    )
    pattern = trace["blocks.0.attn.hook_pattern"]
    assert torch.all(pattern[..., 1:, 0] == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_interventions_compose_in_order_and_capture_sees_the_result(hf_model):
    name = "blocks.0.hook_resid_post"
    trace = nm.load(hf_model).run(
        tokens(),
        interventions={name: lambda x, hook: x * 0 + 1, "blocks.0.hook_resid_*": lambda x, hook: x * 3 if hook.name == name else None},
        capture=name,
    )
    assert torch.equal(trace[name], torch.full_like(trace[name], 3.0))


def test_a_broadcastable_tensor_replaces_every_position(hf_model):
    name = "blocks.0.hook_mlp_out"
    mean = torch.randn(hf_model.config.hidden_size)
    trace = nm.load(hf_model).run(tokens(), interventions={name: mean}, capture=name)
    assert torch.equal(trace[name], mean.expand_as(trace[name]))


def test_hooks_context_keeps_interventions_for_several_runs_and_raw_calls(hf_model):
    model = nm.load(hf_model)
    baseline = main_output(model.run(tokens()).output)
    with model.hooks(interventions={"blocks.*.hook_mlp_out": torch.zeros(())}) as hooked:
        assert hooked.list_hooks() == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
        first = main_output(model.run(tokens(), capture="blocks.0.hook_mlp_out").output)
        with torch.no_grad():
            raw = main_output(bare(hf_model, tokens()))
        second = model.run(tokens(), capture="blocks.0.hook_mlp_out")
    assert torch.equal(first, raw)
    assert torch.equal(second["blocks.0.hook_mlp_out"], torch.zeros_like(second["blocks.0.hook_mlp_out"]))
    assert not torch.equal(first, baseline)
    assert model.list_hooks() == []
    assert torch.equal(main_output(model.run(tokens()).output), baseline)


def test_grad_flows_through_an_intervention_when_asked(hf_model):
    steer = torch.zeros(hf_model.config.hidden_size, requires_grad=True)
    trace = nm.load(hf_model).run(tokens(), interventions={"blocks.0.hook_resid_post": lambda x, hook: x + steer}, grad=True)
    main_output(trace.output).sum().backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0
