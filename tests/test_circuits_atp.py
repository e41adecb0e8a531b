"""Attribution patching of sweep cells against (clean - corrupted activation) . gradient taken by hand with torch
hooks on the HF modules, and its exact re-check against `nm.patch`."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import atp, recheck
from conftest import make_model, output_projection
from test_circuits_attribution import _inputs, _metric

FAMILIES = ["gpt2", "gpt_neox", "llama"]


def _blocks(hf, family):
    return hf.base_model.h if family == "gpt2" else hf.base_model.layers


def _input_and_gradient(hf, module, run_tokens):
    """`module`'s first input on `run_tokens`, and the gradient of the summed metric there (by hand)."""
    seen = {}

    def leaf(m, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_()
        seen["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = module.register_forward_pre_hook(leaf, with_kwargs=True)
    try:
        _metric(hf(run_tokens, use_cache=False).logits).sum().backward()
    finally:
        handle.remove()
    return seen["x"].detach(), seen["x"].grad


@pytest.mark.parametrize("family", FAMILIES)
def test_head_and_residual_estimates_are_the_activation_change_times_the_gradient_by_hand(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    heads = atp(model, clean, corrupt, _metric, what="z", by="layer_head")
    resid = atp(model, clean, corrupt, _metric, what="resid_pre", by="layer_pos")
    with torch.no_grad():
        corrupt_values = _metric(hf(corrupt).logits)
    n_heads = hf.config.num_attention_heads
    for layer in range(2):
        projection = output_projection(hf, family, layer)
        z_clean, _ = _input_and_gradient(hf, projection, clean)
        z_corrupt, gradient = _input_and_gradient(hf, projection, corrupt)
        products = ((z_clean - z_corrupt) * gradient).unflatten(-1, (n_heads, -1)).sum((1, 3))  # [prompt, head]
        assert torch.allclose(heads.per_prompt[layer], (corrupt_values[:, None] + products).T, atol=1e-4)
        x_clean, _ = _input_and_gradient(hf, _blocks(hf, family)[layer], clean)
        x_corrupt, gradient = _input_and_gradient(hf, _blocks(hf, family)[layer], corrupt)
        products = ((x_clean - x_corrupt) * gradient).sum(-1)  # [prompt, position]
        assert torch.allclose(resid.per_prompt[layer], (corrupt_values[:, None] + products).T, atol=1e-4)
    assert "AtP estimate of z" in repr(heads) and heads.forwards == 2
    assert model.list_hooks() == [] and all(p.requires_grad for p in hf.parameters())


def test_the_recheck_patches_the_strongest_cells_exactly_and_leaves_the_rest_blank():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _inputs()
    estimate = atp(model, clean, corrupt, _metric, what="resid_pre", by="layer_pos")
    exact = nm.patch(model, clean, corrupt, _metric, what="resid_pre", by="layer_pos", progress=False)
    checked = recheck(estimate, k=4, progress=False)
    strongest = [labels for labels, _ in estimate.top(4)]
    assert {labels for labels, _ in checked.top(4)} == set(strongest)
    known = ~checked.values.isnan()
    assert int(known.sum()) == 4 and torch.allclose(checked.values[known], exact.values[known], atol=1e-5)
    assert "exact re-check of AtP's 4 strongest cells" in checked.description
    with pytest.raises(nm.InputError, match="nm.circuits.atp"):
        recheck(exact)


def test_on_ioi_head_estimates_track_the_exact_head_sweep():
    from neuronmap import zoo
    from neuronmap.zoo.recipes import ioi

    model = zoo.load("ioi")
    template = "After {A} and {B} arrived at the {place}, {S} threw a {object} to"
    prompts = [p for p in ioi.heldout_prompts(400, 1234) if p["template"] == template][:16]
    clean, corrupt = [p["prompt"] for p in prompts], [ioi.flipped(p) for p in prompts]
    metric = nm.patching.logit_diff([" " + p["io"] for p in prompts], [" " + p["s"] for p in prompts])
    estimate = atp(model, clean, corrupt, metric, what="z", by="layer_head")
    exact = nm.patch(model, clean, corrupt, metric, what="z", by="layer_head", progress=False)
    r = torch.corrcoef(torch.stack([estimate.values.flatten(), exact.values.flatten()]))[0, 1]
    assert r >= 0.9
    assert estimate.top(1)[0][0] == exact.top(1)[0][0] == ("1", "2")
