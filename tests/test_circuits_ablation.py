"""Corruption by mean and resample ablation, against hand-written runs on the HF modules: the mean of every
sender's output taken with torch hooks over reference prompts, a run with every sender writing its mean (the empty
circuit), EAP products with gradients taken on that run, and exact patching rebuilding receivers from the means."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import circuit_metrics, faithfulness, graph, mean_ablation, resample_ablation
from neuronmap.circuits.attribution import edge_scores
from conftest import make_model, tokens, word_tokenizer
from test_circuits_attribution import (
    EDGES, _first, _group_output, _interpolating, _metric, _parts, _receiver_gradient, _sender_output,
)
from test_circuits_exact import CUTS, _hand_run

FAMILIES = ["gpt2", "gpt_neox", "llama"]


def _prompts():
    return tokens(3, 7, seed=2), tokens(5, 7, seed=8)  # clean, reference


def _hand_means(hf, family, reference, per_position=True):
    """Per position (or over every token) means over `reference` of the block input, each attention output
    projection's input (every head's z) and each MLP's output, read with torch hooks."""
    seen, handles = {}, []
    handles.append(_parts(hf, family, 0)[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("embed", _first(args, kwargs)), with_kwargs=True))
    for layer in range(hf.config.num_hidden_layers):
        _, _, _, projection, mlp = _parts(hf, family, layer)
        handles.append(projection.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(("z", layer), args[0])))
        handles.append(mlp.register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(("mlp", layer), out)))
    try:
        with torch.no_grad():
            hf(reference, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.mean(0) if per_position else value.mean((0, 1)) for key, value in seen.items()}


def _ablating(hf, family, means):
    """Hooks making every sender write its mean (each node's deviation added as mean + x - x.detach(), zero in value,
    so that gradients still reach its input): returns a function registering them."""
    def register():
        handles = []

        def embed(m, args, kwargs):
            x = _first(args, kwargs)
            if args:
                return (means["embed"].expand_as(x), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": means["embed"].expand_as(x)}

        handles.append(_parts(hf, family, 0)[0].register_forward_pre_hook(embed, with_kwargs=True))
        for layer in range(hf.config.num_hidden_layers):
            _, _, _, projection, mlp = _parts(hf, family, layer)
            handles.append(projection.register_forward_pre_hook(
                lambda m, args, layer=layer: (means["z", layer] + (args[0] - args[0].detach()),)))
            handles.append(mlp.register_forward_hook(
                lambda m, a, out, layer=layer: means["mlp", layer] + (out - out.detach())))
        return handles

    return register


def _hand_ablated_metric(hf, family, clean, means):
    handles = _ablating(hf, family, means)()
    try:
        with torch.no_grad():
            return _metric(hf(clean, use_cache=False).logits)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_position", [True, False])
def test_the_empty_circuit_is_the_run_with_every_sender_writing_its_mean(family, per_position):
    hf = make_model(family)
    model = nm.load(hf)
    clean, reference = _prompts()
    g = graph(model)
    values, clean_value, ablated_value = circuit_metrics(
        model, clean, mean_ablation(reference, per_position=per_position), _metric, g,
        torch.stack([g.valid, torch.zeros_like(g.valid)]))
    expected = _hand_ablated_metric(hf, family, clean, _hand_means(hf, family, reference, per_position))
    with torch.no_grad():
        assert torch.equal(values[0], _metric(hf(clean).logits))
    assert torch.allclose(values[1], expected, atol=1e-4), (values[1], expected)
    assert torch.allclose(values[1], values[1][0].expand(3))  # no prompt's own activations are left
    assert ablated_value == pytest.approx(float(values[1].mean()))
    scores = faithfulness(model, clean, mean_ablation(reference), _metric, g, torch.stack([g.valid, torch.zeros_like(g.valid)]))
    assert scores.tolist() == [1.0, 0.0]
    assert model.list_hooks() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_under_mean_ablation_is_the_product_of_clean_minus_mean_and_the_gradient_on_the_ablated_run(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, reference = _prompts()
    g, scores, clean_value, ablated_value = edge_scores(model, clean, mean_ablation(reference), _metric)
    means = _hand_means(hf, family, reference)
    assert ablated_value == pytest.approx(float(_hand_ablated_metric(hf, family, clean, means).mean()), abs=1e-4)
    for sender, receiver in EDGES:
        if not g.valid[g.sender(sender), g.receiver(receiver)]:
            continue
        delta = _sender_output(hf, family, clean, sender) - _sender_output(hf, family, reference, sender).mean(0)
        gradient = _receiver_gradient(hf, family, clean, receiver, hooks=_ablating(hf, family, means))
        got = scores[g.sender(sender), g.receiver(receiver)]
        assert got.item() == pytest.approx((delta * gradient).sum().item(), rel=1e-4, abs=1e-5), (sender, receiver)
        assert gradient.abs().sum() > 0  # the ablated run still passes gradients to every receiver


def test_eap_ig_on_activations_under_mean_ablation_moves_each_layer_part_from_its_mean_to_clean():
    hf = make_model("gpt2")
    model = nm.load(hf)
    clean, reference = _prompts()
    steps = 2
    g, scores, *_ = edge_scores(model, clean, mean_ablation(reference), _metric, steps=steps, ig="activations")
    means = _hand_means(hf, "gpt2", reference)
    for sender, receiver in EDGES:
        part = "embed" if sender == "embed" else ("mlp", int(sender[4])) if sender.startswith("MLP") else ("z", int(sender[1]))
        end = _group_output(hf, "gpt2", clean, sender)
        start = means[part].expand_as(end)
        gradient = 0
        for k in range(steps):
            ablate, move = _ablating(hf, "gpt2", means), _interpolating(hf, "gpt2", sender, start, end, k / steps)
            gradient = gradient + _receiver_gradient(hf, "gpt2", clean, receiver, hooks=lambda: [*ablate(), *move()]) / steps
        delta = _sender_output(hf, "gpt2", clean, sender) - _sender_output(hf, "gpt2", reference, sender).mean(0)
        got = scores[g.sender(sender), g.receiver(receiver)]
        assert got.item() == pytest.approx((delta * gradient).sum().item(), rel=1e-4, abs=1e-5), (sender, receiver)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_patching_under_mean_ablation_rebuilds_each_receiver_from_the_means(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, reference = _prompts()
    g = graph(model)
    masks, kept_cuts = [], []
    for cuts in CUTS.values():
        kept = [(s, r) for s, r in cuts if g.valid[g.sender(s), g.receiver(r)]]
        mask = g.valid.clone()
        for sender, receiver in kept:
            mask[g.sender(sender), g.receiver(receiver)] = False
        masks.append(mask)
        kept_cuts.append(kept)
    values, *_ = circuit_metrics(model, clean, mean_ablation(reference), _metric, g, torch.stack(masks))
    for row, cuts in zip(values, kept_cuts):
        means = {s: _sender_output(hf, family, reference, s).mean(0) for s, _ in cuts}
        expected = _hand_run(hf, family, clean, None, cuts, corrupted=means)
        assert torch.allclose(row, expected, atol=1e-4), (row, expected)


def test_resample_ablation_runs_each_prompt_with_another_prompts_activations():
    hf = make_model("gpt2")
    model = nm.load(hf)
    clean = tokens(5, 7, seed=2)
    g = graph(model)
    empty = torch.zeros_like(g.valid)[None]
    values, *_ = circuit_metrics(model, clean, resample_ablation(seed=3), _metric, g, empty)
    with torch.no_grad():
        own = _metric(hf(clean).logits)
    assert len(set(own.tolist())) == 5  # every prompt's run tells itself apart
    sources = [int((own - value).abs().argmin()) for value in values[0]]
    assert torch.allclose(values[0], own[sources], atol=1e-5)
    assert sorted(sources) == list(range(5)) and all(i != j for i, j in enumerate(sources))  # a derangement
    again, *_ = circuit_metrics(model, clean, resample_ablation(seed=3), _metric, g, empty)
    assert torch.equal(again, values)
    # EAP with the resampled prompts as corrupted prompts gives the same scores
    _, resampled, *_ = edge_scores(model, clean, resample_ablation(seed=3), _metric)
    _, by_prompts, *_ = edge_scores(model, clean, clean[sources], _metric)
    assert torch.allclose(resampled, by_prompts, atol=1e-6)


def test_ablations_refuse_what_they_cannot_do():
    model = nm.load(make_model("gpt2"), word_tokenizer())
    clean, reference = _prompts()
    g = graph(model)
    with pytest.raises(nm.InputError, match="per position needs reference prompts of the clean prompts' 7 positions"):
        circuit_metrics(model, clean, mean_ablation(tokens(4, 5)), _metric, g, g.valid[None])
    with pytest.raises(nm.InputError, match="use ig='activations'"):
        edge_scores(model, clean, mean_ablation(reference), _metric, steps=3)
    with pytest.raises(nm.InputError, match="at least 2 prompts"):
        edge_scores(model, clean[:1], resample_ablation(), _metric)
    with pytest.raises(nm.InputError, match="same number of tokens: prompt 0 has 2, prompt 1 has 3"):
        edge_scores(model, ["the cat", "the cat sat"], resample_ablation(), _metric)
    with pytest.raises(nm.InputError, match="one prompt per clean prompt"):
        edge_scores(model, clean, resample_ablation(reference), _metric)
    with pytest.raises(nm.InputError, match="atp estimates"):
        nm.circuits.atp(model, clean, mean_ablation(reference), _metric)
    assert model.list_hooks() == []
