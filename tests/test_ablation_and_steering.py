"""Ablations and steering against the same edit written by hand with torch hooks, and patching on zoo mechanisms."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

import neuronmap as nm
from neuronmap.zoo.recipes import ioi
from conftest import make_model, tokens

N_HEADS, D_HEAD = 4, 8
# transformers 5.25 renamed the forward's KV-cache argument and output from `past_key_values` to `cache`
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(transformers.GPT2LMHeadModel.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def gpt2():
    return nm.load(make_model("gpt2"))


def _with_hook(module, hook, run, pre=False):
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return run()
    finally:
        handle.remove()


def test_zero_ablating_a_head_zeroes_its_slice_of_the_output_projections_input(gpt2):
    hf, x = gpt2.module, tokens()

    def zero_head(module, args):
        z = args[0].clone()
        z[..., 2 * D_HEAD : 3 * D_HEAD] = 0
        return (z,)

    expected = _with_hook(hf.transformer.h[1].attn.c_proj, zero_head, lambda: hf(x).logits, pre=True)
    got = gpt2.run(x, interventions=nm.patching.ablate(gpt2, heads=[(1, 2)])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mean_ablating_an_mlp_puts_its_mean_output_over_the_references_real_tokens(gpt2):
    hf, x, reference = gpt2.module, tokens(), tokens(3, 6, seed=4)
    mask = torch.ones_like(reference)
    mask[0, 4:] = 0  # the mean must leave padding out
    outputs = {}
    _with_hook(hf.transformer.h[0].mlp, lambda m, a, o: outputs.__setitem__("o", o), lambda: hf(reference, attention_mask=mask))
    mean = outputs["o"][mask.bool()].mean(0)
    expected = _with_hook(hf.transformer.h[0].mlp, lambda m, a, o: mean.expand_as(o), lambda: hf(x).logits)
    interventions = nm.patching.ablate(gpt2, mlps=[0], how="mean", reference=reference, reference_mask=mask)
    got = gpt2.run(x, interventions=interventions).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_resample_ablating_a_neuron_takes_it_from_reference_rows_drawn_with_the_seed(gpt2):
    hf, x, reference = gpt2.module, tokens(), tokens(5, 9, seed=7)
    posts = {}
    _with_hook(hf.transformer.h[1].mlp.c_proj, lambda m, a: posts.__setitem__("x", a[0]), lambda: hf(reference), pre=True)
    rows = torch.randint(5, (2,), generator=torch.Generator().manual_seed(3))

    def resample(module, args):
        post = args[0].clone()
        post[..., 17] = posts["x"][rows, :, 17]
        return (post,)

    expected = _with_hook(hf.transformer.h[1].mlp.c_proj, resample, lambda: hf(x).logits, pre=True)
    interventions = nm.patching.ablate(gpt2, neurons=[(1, 17)], how="resample", reference=reference, seed=3)
    torch.testing.assert_close(gpt2.run(x, interventions=interventions).logits, expected, rtol=0, atol=1e-5)


def test_zero_ablating_a_direction_removes_the_residual_streams_component_along_it(gpt2):
    hf, x = gpt2.module, tokens()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    unit = direction / direction.norm()

    def project_out(module, args, output):
        return output - (output @ unit)[..., None] * unit

    expected = _with_hook(hf.transformer.h[0], project_out, lambda: hf(x).logits)
    interventions = nm.patching.ablate(gpt2, directions={"blocks.0.hook_resid_post": direction})
    torch.testing.assert_close(gpt2.run(x, interventions=interventions).logits, expected, rtol=0, atol=1e-5)


def test_steering_changes_generate_as_the_same_addition_by_hand_on_the_cached_step_by_step_forward(gpt2):
    hf, prompt = gpt2.module, tokens(1, 5)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    handle = hf.transformer.h[0].register_forward_hook(lambda m, a, o: o + 3.0 * vector)
    try:
        with torch.no_grad():
            past, ids, new = None, prompt, []
            for _ in range(6):  # greedy decoding, one new position per step on HF's own cache
                out = hf(ids, use_cache=True, **{CACHE_ARGUMENT: past})
                past, ids = getattr(out, CACHE_ARGUMENT), out.logits[:, -1:].argmax(-1)
                new.append(ids)
    finally:
        handle.remove()
    steering = nm.patching.steer(gpt2, "blocks.0.hook_resid_post", vector, 3.0)
    generated = gpt2.generate(prompt, max_new_tokens=6, interventions=steering)
    plain = gpt2.generate(prompt, max_new_tokens=6)
    assert torch.equal(generated[:, 5:], torch.cat(new, 1))
    assert not torch.equal(generated, plain)


def test_a_steering_vector_is_the_difference_of_the_two_sets_mean_last_token_activations(gpt2):
    positive, negative = tokens(3, 6, seed=1), tokens(2, 6, seed=2)
    name = "blocks.1.hook_resid_mid"
    expected = gpt2.run(positive, capture=name)[name][:, -1].mean(0) - gpt2.run(negative, capture=name)[name][:, -1].mean(0)
    torch.testing.assert_close(nm.patching.steering_vector(gpt2, positive, negative, name), expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: nm.patching.steer(m, "blocks.0.hook_resid_post", torch.zeros(31)), r"is 32 wide, so give \[32\]"),
        (lambda m: nm.patching.steer(m, "blocks.*.hook_resid_post", torch.zeros(32)), r"needs one hook point"),
        (lambda m: nm.patching.ablate(m, heads=[(1, 4)]), r"index 4 is out of range for blocks.1.attn.hook_z, which has 4"),
        (lambda m: nm.patching.ablate(m, mlps=[0], how="mean"), r"mean ablation needs reference prompts"),
        (lambda m: nm.patching.ablate(m, mlps=[0], how="average"), r"how must be one of"),
        (lambda m: nm.patching.ablate(m, mlps=[7]), r"blocks.7.hook_mlp_out"),
    ],
)
def test_bad_ablation_and_steering_input_is_a_clear_error(gpt2, call, message):
    with pytest.raises(nm.NeuronMapError, match=message):
        call(gpt2)
    assert gpt2.list_hooks() == []


# --- known mechanisms in the zoo -----------------------------------------------------------------------------------


def test_noising_the_previous_token_head_destroys_induction_and_the_head_sweep_points_at_it():
    model = nm.load("induction-2l")
    clean = nm.repeated_random_tokens(model, length=20, batch=8, seed=0)
    corrupt = clean.clone()
    corrupt[:, 1:21] = nm.repeated_random_tokens(model, length=20, batch=8, seed=1)[:, 1:21]  # nothing to copy

    def repeat_logprob(logits):  # mean log-probability of the repeated half's tokens
        return logits[:, 21:-1].log_softmax(-1).gather(-1, clean[:, 22:, None])[..., 0].mean(1)

    result = nm.patch(model, clean, corrupt, repeat_logprob, "z", "layer_head", direction="noise", progress=False)
    assert result.top(1)[0][0] == ("0", "1")  # previous-token head 0.1, the card's strongest
    assert result.values[0, 1] < 0.5 and result.values[0, 2:].min() > 0.9


def test_the_ioi_head_sweep_finds_the_head_on_the_models_card():
    model = nm.load("ioi")
    prompts = ioi.heldout_prompts(16)

    metric = nm.patching.logit_diff([" " + p["io"] for p in prompts], [" " + p["s"] for p in prompts])
    result = nm.patch(model, [p["prompt"] for p in prompts], [ioi.flipped(p) for p in prompts], metric, "z", progress=False)
    assert result.top(1)[0][0] == ("1", "2")  # the card: "L1H2 matters", direct logit contribution +7.23
    assert result.values[1, 2] > 0.9 and result.values[1, [0, 1, 3]].abs().max() < 0.05
