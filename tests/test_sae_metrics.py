"""`nm.sae.evaluate`: every number against the same quantity computed by hand in the test from plain runs of the
model (the reconstruction put in with an ordinary intervention, the zero-ablation likewise)."""

from __future__ import annotations

import math

import pytest
import torch

import neuronmap as nm
from neuronmap.sae import SAE, SAEMetrics, evaluate

HOOK = "blocks.0.hook_resid_post"
TEXTS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The cat sat on the mat.",
    "One two three four five six seven eight nine ten eleven twelve",
]


@pytest.fixture(scope="module")
def model() -> nm.Model:
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def sae(model) -> SAE:
    width = model.run(TEXTS[0], capture=HOOK)[HOOK].shape[-1]
    sae = SAE("standard", d_in=width, d_sae=256, hook_name=HOOK, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)  # some latents never fire on this little text
    return sae


def next_token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="none")


@torch.no_grad()
def test_every_number_equals_the_hand_computation(model, sae):
    metrics = evaluate(sae, model, TEXTS, context=64, batch_size=2, dense_threshold=0.2, progress=False)
    xs, acts, recons, ce = [], [], [], {"clean": [], "spliced": [], "zero": [], "kl": []}
    for text in TEXTS:  # one prompt at a time: no padding anywhere
        tokens = model.to_tokens(text)
        clean = model.run(tokens, capture=HOOK)
        x = clean[HOOK][0].double()
        pre = (x - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        a = pre.relu()
        xs.append(x), acts.append(a), recons.append(a @ sae.W_dec.double() + sae.b_dec.double())
        spliced = model.run(tokens, interventions={HOOK: lambda v, h: sae.decode(sae.encode(v))}).output.logits
        zeroed = model.run(tokens, interventions={HOOK: lambda v, h: v * 0}).output.logits
        ce["clean"].append(next_token_losses(clean.output.logits, tokens))
        ce["spliced"].append(next_token_losses(spliced, tokens))
        ce["zero"].append(next_token_losses(zeroed, tokens))
        p, q = clean.output.logits[0, :-1].double().log_softmax(-1), spliced[0, :-1].double().log_softmax(-1)
        ce["kl"].append((p.exp() * (p - q)).sum(-1))
    x, a, r = torch.cat(xs), torch.cat(acts), torch.cat(recons)
    mean_ce = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    density = (a > 0).double().mean(0)

    assert metrics.tokens == x.shape[0]
    assert metrics.l0 == pytest.approx(float((a > 0).sum(-1).double().mean()), rel=1e-6)
    assert metrics.mse == pytest.approx(float((x - r).pow(2).mean()), rel=1e-4)
    assert metrics.explained_variance == pytest.approx(
        float(1 - (x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-4)
    assert metrics.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(x, r, dim=-1).mean()), rel=1e-4)
    assert metrics.dead_fraction == pytest.approx(float((density == 0).double().mean()))
    assert 0 < metrics.dead_fraction < 1
    assert metrics.dense_fraction == pytest.approx(float((density > 0.2).double().mean()))
    assert torch.allclose(metrics.density.double(), density, atol=1e-6)
    assert metrics.ce_clean == pytest.approx(mean_ce["clean"], rel=1e-5)
    assert metrics.ce_spliced == pytest.approx(mean_ce["spliced"], rel=1e-4)
    assert metrics.ce_zero_ablation == pytest.approx(mean_ce["zero"], rel=1e-5)
    recovered = (mean_ce["zero"] - mean_ce["spliced"]) / (mean_ce["zero"] - mean_ce["clean"])
    assert metrics.ce_loss_recovered == pytest.approx(recovered, rel=1e-4)
    assert metrics.kl_divergence == pytest.approx(mean_ce["kl"], rel=1e-3)


def test_batching_does_not_change_the_result(model, sae):
    one = evaluate(sae, model, TEXTS, batch_size=1, progress=False).to_dict()
    three = evaluate(sae, model, TEXTS, batch_size=3, progress=False).to_dict()
    for name, value in one.items():
        assert three[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name


def test_a_perfect_reconstruction_recovers_all_the_loss(model):
    """An SAE that is the identity on the residual stream (d_sae = 2·d_in latents ±e_i) recovers everything."""
    width = model.run(TEXTS[0], capture=HOOK)[HOOK].shape[-1]
    sae = SAE("standard", d_in=width, d_sae=2 * width, hook_name=HOOK, apply_b_dec_to_input=False)
    eye = torch.eye(width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    metrics = evaluate(sae, model, TEXTS, progress=False)
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert metrics.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert metrics.kl_divergence == pytest.approx(0.0, abs=1e-6)


def test_metrics_render_a_table_and_a_density_histogram(model, sae):
    metrics = evaluate(sae, model, TEXTS, progress=False)
    assert isinstance(metrics, SAEMetrics)
    page = metrics._repr_html_()
    assert "CE loss recovered" in page and "<svg" in page and "dead latents not shown" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    counts, edges = metrics.density_histogram()
    assert sum(counts) == int((metrics.density > 0).sum()) and len(edges) == len(counts) + 1
    assert metrics.figure().data[0].type == "bar"
    assert "explained variance" in repr(metrics)


def test_bad_inputs_name_the_problem(model, sae):
    with pytest.raises(nm.HookNameError):
        evaluate(sae, model, TEXTS, hook_name="blocks.9.hook_resid_post", progress=False)
    with pytest.raises(nm.SAEError, match="d_in=7"):
        evaluate(SAE("standard", d_in=7, d_sae=8, hook_name=HOOK), model, TEXTS, progress=False)
    with pytest.raises(nm.InputError, match="dense_threshold"):
        evaluate(sae, model, TEXTS, dense_threshold=5, progress=False)
    assert model.list_hooks() == []
    assert not math.isnan(evaluate(sae, model, TEXTS[:1], progress=False).l0)
