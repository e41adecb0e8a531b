"""Hook points of every supported family against HF's own outputs and hand computation."""

from __future__ import annotations

import importlib

import pytest
import torch

import neuronmap as nm
from conftest import ENCODERS, PRE_LN, ROTARY, bare, eager_copy, main_output, make_model, output_projection, tokens

N_LAYERS = 2


@pytest.fixture(scope="module")
def full_trace(hf_model):
    return nm.load(hf_model).run(tokens(), capture="*")


def test_every_family_has_the_transformerlens_names(hf_model, family):
    names = set(nm.load(hf_model).hook_names)
    for layer in range(N_LAYERS):
        for suffix in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post"):
            assert f"blocks.{layer}.{suffix}" in names
        for suffix in ("q", "k", "v", "z", "attn_scores", "pattern"):
            assert f"blocks.{layer}.attn.hook_{suffix}" in names
    assert "hook_embed" in names
    assert ("hook_pos_embed" in names) == (family not in ROTARY)
    assert ("ln_final.hook_normalized" in names) == (family not in ENCODERS)
    assert ("blocks.0.hook_resid_mid" in names) == (family != "gpt_neox")  # parallel attention + MLP has none


def test_logits_are_bit_identical_to_the_bare_forward_while_capturing_all_but_attention(hf_model):
    model = nm.load(hf_model)
    names = [n for n in model.hook_names if not n.endswith(("hook_pattern", "hook_attn_scores"))]
    trace = model.run(tokens(), capture=names)
    assert len(trace) == len(names)
    assert torch.equal(main_output(trace.output), main_output(bare(hf_model, tokens())))


def test_capturing_patterns_runs_those_layers_eagerly_bit_identical_to_hf_eager(hf_model, full_trace):
    assert torch.equal(main_output(full_trace.output), main_output(bare(eager_copy(hf_model), tokens())))


def test_resid_pre_and_post_equal_hf_hidden_states(hf_model, family):
    full_trace = nm.load(hf_model).run(tokens(), capture=[n for n in nm.load(hf_model).hook_names if "resid" in n or "ln_final" in n])
    hidden = bare(hf_model, tokens(), output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        assert torch.equal(full_trace[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    if family in ENCODERS:  # post-LN: every hidden state is a block output
        for layer in range(N_LAYERS):
            assert torch.equal(full_trace[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    else:  # HF's last hidden state is the final norm's output
        assert torch.equal(full_trace["blocks.0.hook_resid_post"], hidden[1])
        assert torch.equal(full_trace["ln_final.hook_normalized"], hidden[-1])


def test_pattern_equals_hf_output_attentions_of_an_eager_copy(hf_model, full_trace):
    attentions = bare(eager_copy(hf_model), tokens(), output_attentions=True).attentions
    for layer in range(N_LAYERS):
        assert torch.equal(full_trace[f"blocks.{layer}.attn.hook_pattern"], attentions[layer])


def test_pattern_on_an_eager_model_is_exactly_hf_output_attentions(family):
    eager = make_model(family, attn="eager")
    trace = nm.load(eager).run(tokens(), capture="blocks.*.attn.hook_pattern")
    output = bare(eager, tokens(), output_attentions=True)
    for layer in range(N_LAYERS):
        assert torch.equal(trace[f"blocks.{layer}.attn.hook_pattern"], output.attentions[layer])
    assert torch.equal(main_output(trace.output), main_output(output))


def test_shapes_follow_transformerlens(hf_model, full_trace):
    config = hf_model.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    n_kv = getattr(config, "num_key_value_heads", n_heads)
    batch, pos = tokens().shape
    assert full_trace["blocks.0.attn.hook_q"].shape == (batch, pos, n_heads, d_head)
    assert full_trace["blocks.0.attn.hook_k"].shape == (batch, pos, n_kv, d_head)
    assert full_trace["blocks.0.attn.hook_z"].shape == (batch, pos, n_heads, d_head)
    assert full_trace["blocks.0.attn.hook_pattern"].shape == (batch, n_heads, pos, pos)
    assert full_trace["blocks.0.attn.hook_attn_scores"].shape == (batch, n_heads, pos, pos)
    assert full_trace["blocks.0.attn.hook_result"].shape == (batch, pos, n_heads, config.hidden_size)
    assert full_trace["blocks.0.ln1.hook_scale"].shape == (batch, pos, 1)
    assert full_trace["blocks.0.hook_resid_post"].shape == (batch, pos, config.hidden_size)
    if "hook_pos_embed" in full_trace:
        assert full_trace["hook_pos_embed"].shape == (batch, pos, config.hidden_size)


def test_pattern_is_softmax_of_scores(full_trace):
    for layer in range(N_LAYERS):
        scores = full_trace[f"blocks.{layer}.attn.hook_attn_scores"]
        torch.testing.assert_close(full_trace[f"blocks.{layer}.attn.hook_pattern"], scores.softmax(-1), rtol=0, atol=1e-6)


def test_z_is_pattern_times_v(full_trace):
    for layer in range(N_LAYERS):
        pattern = full_trace[f"blocks.{layer}.attn.hook_pattern"]
        v = full_trace[f"blocks.{layer}.attn.hook_v"]
        v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)  # grouped-query attention
        expected = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        torch.testing.assert_close(full_trace[f"blocks.{layer}.attn.hook_z"], expected, rtol=1e-5, atol=1e-5)


def test_scores_are_scaled_q_dot_k_after_positions(hf_model, full_trace, family):
    for layer in range(N_LAYERS):
        q = full_trace[f"blocks.{layer}.attn.hook_q"]
        k = full_trace[f"blocks.{layer}.attn.hook_k"]
        if family in ROTARY:
            q, k = _rotate(hf_model, family, q, k)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        expected = full_trace[f"blocks.{layer}.attn.hook_attn_scores"]
        visible = expected > torch.finfo(expected.dtype).min / 2
        assert family in ENCODERS or not visible.all()  # causal families mask the future
        torch.testing.assert_close(scores[visible], expected[visible], rtol=1e-5, atol=1e-4)


def test_attn_out_is_z_through_the_output_projection(hf_model, full_trace, family):
    for layer in range(N_LAYERS):
        projection = output_projection(hf_model, family, layer)
        # weight as [n_heads * d_head, d_model]: GPT-2's Conv1D stores it that way round, nn.Linear transposed
        weight = projection.weight if family == "gpt2" else projection.weight.T
        bias = projection.bias
        z = full_trace[f"blocks.{layer}.attn.hook_z"]
        per_head = weight.unflatten(0, (z.shape[2], z.shape[3]))
        expected = torch.einsum("bphd,hdm->bpm", z, per_head) + (0 if bias is None else bias)
        torch.testing.assert_close(full_trace[f"blocks.{layer}.hook_attn_out"], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pre_ln_family", PRE_LN)
def test_attn_out_and_mlp_out_add_up_to_the_residual_stream(pre_ln_family):
    trace = nm.load(make_model(pre_ln_family)).run(tokens(), capture="*")
    for layer in range(N_LAYERS):
        pre, post = trace[f"blocks.{layer}.hook_resid_pre"], trace[f"blocks.{layer}.hook_resid_post"]
        attn_out, mlp_out = trace[f"blocks.{layer}.hook_attn_out"], trace[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(pre + attn_out + mlp_out, post, rtol=1e-5, atol=1e-4)
        if f"blocks.{layer}.hook_resid_mid" in trace:
            torch.testing.assert_close(pre + attn_out, trace[f"blocks.{layer}.hook_resid_mid"], rtol=1e-5, atol=1e-4)


def test_mlp_post_is_the_activation_of_mlp_pre(hf_model, full_trace, family):
    config = hf_model.config
    act = getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)
    from transformers.activations import ACT2FN

    pre = full_trace["blocks.0.mlp.hook_pre"]
    expected = ACT2FN[act](pre)
    if "blocks.0.mlp.hook_pre_linear" in full_trace:  # gated MLP
        expected = expected * full_trace["blocks.0.mlp.hook_pre_linear"]
    torch.testing.assert_close(full_trace["blocks.0.mlp.hook_post"], expected, rtol=1e-5, atol=1e-5)


def test_capturing_the_pattern_of_an_sdpa_model_does_not_change_its_attention_setting(hf_model):
    model = nm.load(hf_model)
    before = hf_model.config._attn_implementation
    model.run(tokens(), capture="blocks.0.attn.hook_pattern")
    assert hf_model.config._attn_implementation == before == "sdpa"


def _rotate(model, family, q, k):
    """Apply the family's own rotary embedding (HF's functions) to q, k shaped [batch, pos, head, d_head]."""
    modeling = importlib.import_module(type(model).__module__)
    base = model.base_model
    positions = torch.arange(q.shape[1]).unsqueeze(0)
    cos, sin = base.rotary_emb(q, positions)
    q_rot, k_rot = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_rot.transpose(1, 2), k_rot.transpose(1, 2)
