"""CAVs, TCAV and concept algebra: directions against scikit-learn fits and planted ones, directional derivatives
against finite differences through a plain forward hook, TCAV's statistics against scipy, and steering against
adding the vector by hand."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import neuronmap as nm
from neuronmap.analysis.concepts import concept_activation_vector, cav, directional_derivatives, tcav
from neuronmap.zoo.recipes.ioi import NAMES, OBJECTS, OTHER_TEMPLATES, PLACES, TRAIN_TEMPLATES

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return nm.load("ioi")


def _ids(model, *names: str) -> list[int]:
    return [model.tokenizer.encode(n, add_special_tokens=False)[0] for n in names]


@contextlib.contextmanager
def _adding(module: torch.nn.Module, vector: torch.Tensor, positions=slice(None)):
    """A plain forward hook adding `vector` to the module's output at `positions`."""

    def add(mod, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, positions] += vector.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def _ioi(rng: random.Random, names=NAMES) -> tuple[str, tuple[str, str]]:
    io, s = rng.sample(list(names), 2)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    text = rng.choice(TRAIN_TEMPLATES).format(A=a, B=b, S=s, place=rng.choice(PLACES), object=rng.choice(OBJECTS))
    return text, (io, s)


def _other(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    return rng.choice(OTHER_TEMPLATES).format(A=a, B=b, place=rng.choice(PLACES), object=rng.choice(OBJECTS),
                                              count="three")


def test_a_cav_is_the_unit_normal_of_sklearns_boundary_and_finds_a_planted_direction():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=16)
    planted /= np.linalg.norm(planted)
    concept = rng.normal(size=(60, 16)) + 5 * planted
    counter = rng.normal(size=(60, 16))
    direction = cav(concept, counter, seed=1)
    assert float(direction.vector.norm()) == pytest.approx(1.0)
    assert direction.accuracy > 0.95
    assert float(direction.vector @ torch.from_numpy(planted)) > 0.9
    fitted = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(
        np.r_[concept, counter], np.r_[np.ones(60), np.zeros(60)])
    normal = fitted[-1].coef_[0] / fitted[0].scale_
    np.testing.assert_allclose(direction.vector.numpy(), normal / np.linalg.norm(normal), atol=1e-9)


def test_directional_derivative_equals_a_finite_difference_along_the_cav(model):
    concept = [_ioi(random.Random(i))[0] for i in range(8)]
    others = [_other(random.Random(100 + i)) for i in range(8)]
    direction = concept_activation_vector(model, concept, others, HOOK, folds=4)
    texts = ["When Mary and John went to the store, John gave a drink to",
             "After John and Mary went to the park, John gave a book to the"]  # padded in a batch
    mary, john = _ids(model, "Mary", "John")
    for positions, where in (("last", -1), ("all", slice(None))):
        got = directional_derivatives(model, texts, direction, ("Mary", "John"), positions=positions)
        for text, value in zip(texts, got):
            ids = model.to_tokens(text)

            def diff(eps: float) -> float:
                with _adding(model.module.transformer.h[0], eps * direction.vector.float(), where), torch.no_grad():
                    logits = model.module(ids).logits[0, -1]
                return float(logits[mary] - logits[john])

            eps = 0.05
            assert float(value) == pytest.approx((diff(eps) - diff(-eps)) / (2 * eps), rel=1e-2, abs=2e-4)
    assert all(p.grad is None for p in model.module.parameters())  # only the hook's gradient was taken


def test_tcav_flags_the_ioi_structure_and_not_random_text(model):
    """Target: each IOI prompt's logit difference between its indirect object and its subject (names varied, so
    the target's gradients point different ways for different prompts). Concept: other IOI prompts (two names, one
    repeated as the subject, ending where the indirect object is due); random texts: the zoo's other templated
    sentences over the same names, places and objects without that structure. At layer 0's output on the last token
    the concept direction is what layer 0 writes there in IOI contexts (the card: heads L0H1 and L0H2 bring both
    names to the final position), and moving along it raises IO − S for most prompts (score ≈ 0.7 against ≈ 0.5
    for random CAVs). Three 'concepts' that are just more random sentences are not significant at α = 0.05
    after Bonferroni over the four concepts (for this seed: random concepts with a fixed set can be consistently
    off 0.5, a known weakness of TCAV's test)."""
    rng = random.Random(0)
    targets = [_ioi(rng) for _ in range(40)]
    texts, pairs = [t for t, _ in targets], [p for _, p in targets]
    concept = [_ioi(rng)[0] for _ in range(20)]
    pool = [_other(rng) for _ in range(80)]
    concepts = {"IOI": concept, **{f"random {i}": [_other(rng) for _ in range(20)] for i in range(3)}}
    result = tcav(model, texts, concepts, pool, HOOK, pairs, seed=0)
    assert result.significant == {"IOI": True, "random 0": False, "random 1": False, "random 2": False}
    assert result.score("IOI") > 0.6 and abs(result.random_scores.mean() - 0.5) < 0.1
    for name, scores in result.scores.items():
        p = scipy.stats.ttest_ind(scores, result.random_scores).pvalue
        assert result.p_values[name] == pytest.approx(p)
        assert result.corrected_p_values[name] == pytest.approx(min(1.0, 4 * p))
    # each score is the fraction of targets whose directional derivative along that run's CAV is positive
    first = result.cavs["IOI"][0]
    assert result.scores["IOI"][0] == pytest.approx(
        float((directional_derivatives(model, texts, first, pairs) > 0).double().mean()))
    html = result._repr_html_()
    assert "Bonferroni" in html and "random 2" in html
    assert result.to_numpy().shape == (4, 10) and len(result.figure().data) == 5


def test_steering_by_a_cav_adds_scale_times_direction_at_the_hook(model):
    direction = cav(torch.randn(20, 128) + 1, torch.randn(20, 128), HOOK, seed=0)  # bare rows, named hook
    texts = ["When Mary and John went to the store, John gave a drink to", "Mary and John went to the park."]
    batch = model.to_tokens(texts)
    mask = (batch != model.tokenizer.pad_token_id).long()
    steered = model.run(texts, interventions=direction.steer(3.0)).logits
    with _adding(model.module.transformer.h[0], 3.0 * direction.vector.float()), torch.no_grad():
        reference = model.module(batch, attention_mask=mask).logits
    torch.testing.assert_close(steered, reference)
    at_two = model.run(texts, interventions=direction.steer(-2.0, positions=[2])).logits
    with _adding(model.module.transformer.h[0], -2.0 * direction.vector.float(), [2]), torch.no_grad():
        reference = model.module(batch, attention_mask=mask).logits
    torch.testing.assert_close(at_two, reference)
    generated = model.generate(texts[0], max_new_tokens=3, interventions=direction.steer(3.0))
    with _adding(model.module.transformer.h[0], 3.0 * direction.vector.float()):
        by_hand = model.generate(texts[0], max_new_tokens=3)
    assert generated == by_hand
    assert not model.list_hooks()


def test_concept_algebra_adds_subtracts_and_scales_directions_of_one_hook():
    a = cav(torch.randn(10, 8) + 1, torch.randn(10, 8), folds=2)
    b = cav(torch.randn(10, 8) - 1, torch.randn(10, 8), folds=2)
    torch.testing.assert_close((a + b).vector, a.vector + b.vector)
    torch.testing.assert_close((a - b).vector, a.vector - b.vector)
    torch.testing.assert_close((2.5 * a).vector, 2.5 * a.vector)
    torch.testing.assert_close((a * -1).vector, (-a).vector)
    assert (a + b).accuracy is None and "+" in (a + b).name
    b.hook = "blocks.0.hook_resid_post"
    with pytest.raises(nm.InputError, match="combine directions of one hook point"):
        a + b
    with pytest.raises(nm.InputError, match="combine directions of one width"):
        a - cav(torch.randn(10, 4) + 1, torch.randn(10, 4), folds=2)
    with pytest.raises(nm.InputError, match="no hook point"):
        a.steer(1.0)


def test_bad_input_names_the_problem(model):
    with pytest.raises(nm.InputError, match="8 wide and the counterexamples' 6"):
        cav(torch.randn(10, 8), torch.randn(10, 6))
    with pytest.raises(nm.InputError, match="concept set has 3 rows; 5-fold"):
        cav(torch.randn(3, 8), torch.randn(10, 8))
    with pytest.raises(nm.InputError, match="NaN"):
        cav(torch.full((10, 8), float("nan")), torch.randn(10, 8))
    texts = [_other(random.Random(i)) for i in range(12)]
    with pytest.raises(nm.InputError, match="at least 20"):
        tcav(model, texts[:2], texts[:10], texts, HOOK, "Mary")
    with pytest.raises(nm.InputError, match="one per text"):
        tcav(model, texts[:2], texts[:5], texts, HOOK, ["Mary"] * 3, folds=2)
    with pytest.raises(nm.InputError, match="one hook point"):
        tcav(model, texts[:2], texts[:5], texts, "blocks.*.hook_resid_post", "Mary", folds=2)
    with pytest.raises(nm.InputError, match="2 tokens"):
        tcav(model, texts[:2], texts[:5], texts, HOOK, "Mary John", folds=2)
