"""Splicing SAEs into a model: reconstruction in place of the activation, the error term that leaves the output
unchanged, and the SAE's insides as hook points that capture, interventions and gradients reach — each checked
against the same edit made by hand at the model's own hook point."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.sae import SAE

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat on the mat. The cat"]


@pytest.fixture(scope="module")
def model() -> nm.Model:
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def width(model) -> int:
    return model.run(PROMPTS[0], capture=HOOK)[HOOK].shape[-1]


def sae_for(width: int, architecture: str = "topk", **fields) -> SAE:
    k = fields.pop("k", 8 if architecture in ("topk", "batchtopk") else None)
    sae = SAE(architecture, d_in=width, d_sae=4 * width, k=k, hook_name=HOOK, seed=1, **fields)
    with torch.no_grad():  # biases away from zero so the hand formula's every term matters
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return sae


def hand_reconstruction(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.cfg.architecture == "topk":
        values, indices = pre.topk(sae.cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    elif sae.cfg.architecture == "jumprelu":
        acts = torch.where(pre > sae.threshold, pre, 0).relu()
    else:
        acts = pre.relu()
    return acts @ sae.W_dec + sae.b_dec


def test_error_term_leaves_the_output_bit_for_bit(model, width):
    sae = sae_for(width)
    clean = model.run(PROMPTS).output.logits
    spliced = model.run(PROMPTS, saes=[sae], use_error_term=True).output.logits
    assert torch.equal(spliced, clean)


def test_error_term_output_is_unchanged_while_latents_are_captured(model, width):
    sae = sae_for(width)
    clean = model.run(PROMPTS, capture=HOOK)
    trace = model.run(PROMPTS, saes={HOOK: sae}, use_error_term=True, capture=f"{HOOK}.hook_sae_*")
    assert torch.equal(trace.output.logits, clean.output.logits)
    x = clean[HOOK]
    assert torch.equal(trace[f"{HOOK}.hook_sae_input"], x)
    assert torch.allclose(trace[f"{HOOK}.hook_sae_recons"], hand_reconstruction(sae, x), atol=1e-5)
    error = trace[f"{HOOK}.hook_sae_error"]
    assert torch.allclose(error, x - hand_reconstruction(sae, x), atol=1e-5)
    assert ((trace[f"{HOOK}.hook_sae_acts_post"] > 0).sum(-1) == 8).all()


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_without_error_term_the_hook_passes_the_reconstruction(model, width, architecture):
    sae = sae_for(width, architecture)
    spliced = model.run(PROMPTS, saes=[sae], capture=HOOK)
    by_hand = model.run(PROMPTS, interventions={HOOK: lambda x, hook: hand_reconstruction(sae, x)}, capture=HOOK)
    assert torch.allclose(spliced[HOOK], by_hand[HOOK], atol=1e-5)
    assert torch.allclose(spliced.output.logits, by_hand.output.logits, atol=1e-4)
    assert not torch.allclose(spliced.output.logits, model.run(PROMPTS).output.logits, atol=1e-2)


def test_ablating_a_feature_removes_its_decoder_direction(model, width):
    sae = sae_for(width)
    acts = model.run(PROMPTS, saes=[sae], capture=f"{HOOK}.hook_sae_acts_post")[f"{HOOK}.hook_sae_acts_post"]
    feature = int(acts.flatten(0, 1).gt(0).sum(0).argmax())  # the feature that fires most often

    def ablate(a, hook):
        a[..., feature] = 0

    ablated = model.run(PROMPTS, saes=[sae], use_error_term=True, interventions={f"{HOOK}.hook_sae_acts_post": ablate})
    by_hand = model.run(PROMPTS, interventions={HOOK: lambda x, hook: x - acts[..., feature, None] * sae.W_dec[feature]})
    assert torch.allclose(ablated.output.logits, by_hand.output.logits, atol=1e-4)


def test_steering_with_a_feature_adds_its_decoder_direction(model, width):
    sae = sae_for(width)
    feature, strength = 17, 6.0

    def steer(a, hook):
        a[..., feature] += strength

    steered = model.run(PROMPTS, saes=[sae], use_error_term=True, interventions={f"{HOOK}.hook_sae_acts_post": steer})
    by_hand = model.run(PROMPTS, interventions={HOOK: lambda x, hook: x + strength * sae.W_dec[feature]})
    assert torch.allclose(steered.output.logits, by_hand.output.logits, atol=1e-4)


def test_gradient_reaches_the_latents_through_the_decoder(model, width):
    sae = sae_for(width)
    acts_name = f"{HOOK}.hook_sae_acts_post"
    trace = model.run(PROMPTS, saes=[sae], use_error_term=True, capture_grad=[HOOK, acts_name])
    trace.output.logits[:, -1].logsumexp(-1).sum().backward()
    assert torch.allclose(trace.grad(acts_name), trace.grad(HOOK) @ sae.W_dec.T, atol=1e-5)


def test_spliced_block_keeps_the_names_and_generation_with_error_term_is_unchanged(model, width):
    sae = sae_for(width)
    clean = model.generate(PROMPTS[1], max_new_tokens=5)
    with model.spliced(sae, use_error_term=True) as spliced_model:
        assert f"{HOOK}.hook_sae_acts_post" in model.hook_names
        assert model.hook_names.index(f"{HOOK}.hook_sae_input") == model.hook_names.index(HOOK) + 1
        assert spliced_model.generate(PROMPTS[1], max_new_tokens=5) == clean
    assert not any("hook_sae" in name for name in model.hook_names)
    assert model.list_hooks() == []


def test_hook_z_sae_reads_heads_flattened(model):
    hook = "blocks.0.attn.hook_z"
    z = model.run(PROMPTS, capture=hook)[hook]
    sae = SAE("standard", d_in=z.shape[-2] * z.shape[-1], d_sae=64, hook_name=hook, reshape_activations="hook_z", seed=0)
    clean = model.run(PROMPTS).output.logits
    assert torch.equal(model.run(PROMPTS, saes=[sae], use_error_term=True).output.logits, clean)
    recons = model.run(PROMPTS, saes=[sae], capture=hook)[hook]
    assert torch.allclose(recons, hand_reconstruction(sae, z.flatten(-2)).unflatten(-1, z.shape[-2:]), atol=1e-5)


def test_width_mismatch_is_a_clear_error_and_leaves_no_hook(model, width):
    sae = SAE("standard", d_in=width + 1, d_sae=16, hook_name=HOOK)
    with pytest.raises(nm.SAEError, match=rf"d_in={width + 1}.*last dimension {width}"):
        model.run(PROMPTS, saes=[sae])
    assert model.list_hooks() == [] and not any("hook_sae" in n for n in model.hook_names)


def test_bad_splices_name_the_problem(model, width):
    sae = sae_for(width)
    with pytest.raises(nm.HookNameError, match="did you mean 'blocks.1.hook_resid_post'"):
        model.run(PROMPTS, saes={"blocks.1.hook_resid_pots": sae})
    with pytest.raises(nm.InputError, match="names no hook point"):
        model.run(PROMPTS, saes=[SAE("standard", d_in=width, d_sae=8)])
    with pytest.raises(nm.InputError, match="two hook points"):
        model.run(PROMPTS, saes={HOOK: sae, "blocks.0.hook_resid_post": sae})
    with model.spliced(sae):
        with pytest.raises(nm.InputError, match="already spliced"):
            model.run(PROMPTS, saes=[sae_for(width)])
    with pytest.raises(nm.InputError, match="cannot splice"):
        model.run(PROMPTS, saes={HOOK: torch.nn.Linear(2, 2)})
    assert model.list_hooks() == [] and not any("hook_sae" in n for n in model.hook_names)


@pytest.mark.parametrize("architecture, rescale", [("jumprelu", False), ("batchtopk", False), ("batchtopk", True)])
def test_normalizing_the_decoder_keeps_latents_and_reconstructions(architecture, rescale):
    sae = SAE(architecture, d_in=16, d_sae=64, k=4 if architecture == "batchtopk" else None, seed=0,
              rescale_acts_by_decoder_norm=rescale)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1, generator=g) * 2 + 0.5)  # unequal decoder norms
        sae.threshold.copy_(torch.rand(64, generator=g) * 0.5)
    x = torch.randn(32, 16, generator=g)
    before_acts, before = sae.encode(x), sae(x)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.encode(x) > 0, before_acts > 0)
    assert torch.allclose(sae(x), before, atol=1e-5)
