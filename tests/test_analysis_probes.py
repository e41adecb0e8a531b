"""Linear probes, their control task and selectivity, and the probe-by-layer curve, against scikit-learn's own
cross-validation and data built by hand whose answer is known."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import neuronmap as nm
from neuronmap.analysis.activations import as_matrix
from neuronmap.analysis.probes import control_task, probe, probe_by_layer
from neuronmap.zoo.recipes.ioi import OBJECTS, PLACES, TRAIN_TEMPLATES


def _planted(n: int = 300, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, (x @ rng.normal(size=d) > 0).astype(int)


def test_a_probe_recovers_a_planted_linear_label_and_not_shuffled_ones():
    x, y = _planted()
    found = probe(x, y, control=False)
    assert found.accuracy > 0.95
    shuffled = probe(x, np.random.default_rng(1).permutation(y), control=False)
    assert abs(shuffled.accuracy - 0.5) < 0.1
    predicted = found.predict(x)
    assert (predicted == y).mean() > 0.95
    # the direction is the refitted probe's weights in the activations' units: it scores rows as the probe does
    decision = x @ found.direction.numpy()
    assert np.corrcoef(decision, x @ np.linalg.lstsq(x, 2.0 * y - 1, rcond=None)[0])[0, 1] > 0.9


def test_fold_scores_equal_sklearns_cross_val_score_with_the_same_splitter_and_model():
    x, y = _planted(seed=3)
    got = probe(x, y, control=False, folds=4, seed=7, regularization=0.5)
    reference = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(C=2.0, max_iter=2000)), x, y,
        cv=StratifiedKFold(4, shuffle=True, random_state=7),
    )
    np.testing.assert_allclose(got.fold_accuracies, reference, rtol=0, atol=1e-12)
    assert got.accuracy == pytest.approx(reference.mean())
    target = x[:, 0] * 2 - x[:, 1] + 0.3 * np.random.default_rng(0).normal(size=len(x))
    ridge = probe(x, target, kind="ridge", control=False, folds=3, seed=2, regularization=3.0)
    reference = cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=3.0)), x, target,
                                cv=KFold(3, shuffle=True, random_state=2))
    np.testing.assert_allclose(ridge.fold_accuracies, reference, rtol=0, atol=1e-12)
    assert ridge.majority_baseline == 0.0 and ridge.measure == "R²"


def test_control_labels_are_constant_per_type_and_drawn_from_the_label_distribution():
    rng = np.random.default_rng(0)
    labels = (rng.random(20_000) < 0.3).astype(int) + 5  # classes 5 and 6, 30% sixes
    types = rng.integers(0, 4000, size=len(labels))
    control = control_task(labels, types, seed=1)
    for t in np.unique(types)[:200]:
        assert len(np.unique(control[types == t])) == 1
    per_type = np.array([control[types == t][0] for t in np.unique(types)])
    assert set(per_type) <= {5, 6}
    assert abs((per_type == 6).mean() - (labels == 6).mean()) < 0.03  # 4000 draws: 3 standard errors ≈ 0.022


def test_selectivity_is_accuracy_minus_the_control_tasks_accuracy_on_the_same_folds():
    x, y = _planted(seed=5)
    types = np.random.default_rng(2).integers(0, 30, size=len(y))
    got = probe(x, y, token_types=types, seed=4)
    splitter = StratifiedKFold(5, shuffle=True, random_state=4)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    control = control_task(y, types, seed=4)
    splits = list(splitter.split(x, y))  # the control task is scored on the real task's folds
    reference = [model.fit(x[tr], control[tr]).score(x[te], control[te]) for tr, te in splits]
    np.testing.assert_allclose(got.control_fold_accuracies, reference, atol=1e-12)
    assert got.selectivity == pytest.approx(got.accuracy - np.mean(reference))


def test_a_label_fixed_by_the_token_type_gives_low_selectivity_and_one_that_is_not_gives_high():
    """40 token types, each with its own random 64-d embedding (more dimensions than types, so a linear probe can
    memorise any labelling of the types). A label that is a function of the type is then learnt, but so is the
    control task: selectivity is low. Rows whose activations encode a per-row bit along one direction and nothing
    about their type give a probe that reads the bit while the control task (labels per type) is unlearnable."""
    rng = np.random.default_rng(0)
    types = rng.integers(0, 40, size=800)
    embeddings = rng.normal(size=(40, 64))
    by_type = rng.integers(0, 2, size=40)[types]
    memorised = probe(embeddings[types] + 0.05 * rng.normal(size=(800, 64)), by_type, token_types=types)
    assert memorised.accuracy > 0.95 and memorised.control_accuracy > 0.9
    assert memorised.selectivity < 0.1
    bit = rng.integers(0, 2, size=800)
    direction = rng.normal(size=64)
    encoded = np.outer(2 * bit - 1, direction) + rng.normal(size=(800, 64))
    read = probe(encoded, bit, token_types=types)
    assert read.accuracy > 0.95 and read.control_accuracy < 0.65
    assert read.selectivity > 0.3


def test_a_trace_gives_its_tokens_as_types_and_a_store_its_token_column(tmp_path):
    model = nm.load("induction-2l")
    hook = "blocks.0.hook_resid_post"
    texts = ["a b c d e f g h", "b c d a e f", "c a b d e f g", "d d c b a e"]
    trace = model.run(texts, capture=hook)
    rows = as_matrix(trace, hook)
    labels = np.arange(len(rows)) % 2
    tokens = trace.tokens[trace.attention_mask.bool()]
    got = probe(trace, labels, hook, folds=3)
    same = probe(rows, labels, folds=3, token_types=tokens)
    np.testing.assert_array_equal(got.control_fold_accuracies, same.control_fold_accuracies)
    store = nm.extract(model, texts, hook, tmp_path / "s.h5", progress=False, dtype=torch.float32)
    stored = probe(store, np.arange(len(store.tokens)) % 2, folds=3)
    reference = probe(store[hook][:], np.arange(len(store.tokens)) % 2, folds=3, token_types=store.tokens)
    np.testing.assert_array_equal(stored.control_fold_accuracies, reference.control_fold_accuracies)
    curve = probe_by_layer(store, np.arange(len(store.tokens)) % 2, hooks="blocks.*", folds=3)
    assert curve.hooks == [hook] and curve[hook].accuracy == stored.accuracy


def test_probe_by_layer_finds_the_indirect_object_in_the_last_layer_not_the_embedding():
    """IOI prompts with the names Mary and John in both orders (ABBA and BABA) and both roles: at the last token
    the embedding (`blocks.0.hook_resid_pre`: 'to' plus its position) is the same for a prompt and its name-swapped
    twin, so no probe can tell which name is the indirect object there, while the final residual stream predicts
    it (the model's logit difference is linear in it after the final norm's centring)."""
    rng = random.Random(0)
    texts, labels = [], []
    for _ in range(30):
        template, place, obj = rng.choice(TRAIN_TEMPLATES), rng.choice(PLACES), rng.choice(OBJECTS)
        for io, s in (("Mary", "John"), ("John", "Mary")):
            for a, b in ((io, s), (s, io)):
                texts.append(template.format(A=a, B=b, S=s, place=place, object=obj))
                labels.append(io)
    model = nm.load("ioi")
    hooks = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]
    trace = model.run(texts, capture=hooks, capture_positions="last")
    embedded = trace["blocks.0.hook_resid_pre"][:, 0]
    assert torch.equal(embedded[0::4], embedded[2::4])  # a prompt and its twin with the roles swapped
    curve = probe_by_layer(trace, labels, hooks=hooks, control=False)
    assert curve.hooks == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert curve["blocks.0.hook_resid_pre"].accuracy <= 0.6
    assert curve["blocks.1.hook_resid_post"].accuracy >= 0.95
    assert curve.best_layer == "blocks.1.hook_resid_post"
    html = curve._repr_html_()
    assert "<svg" in html and "blocks.1.hook_resid_post" in html
    assert curve.to_numpy().shape == (3, 3)


def test_renders_bounded_and_escaped():
    x, y = _planted()
    labels = np.where(y == 1, "<b>yes</b>", "no")
    result = probe(x, labels, token_types=np.arange(len(y)) % 7)
    html = result._repr_html_()
    assert "selectivity" in html and "<b>" not in html
    assert repr(result).startswith("ProbeResult(logistic, 300 rows, accuracy")
    assert set(result.predict(x[:5])) <= {"<b>yes</b>", "no"}
    curve = probe_by_layer({"a": x, "<i>b</i>": x[:, ::-1].copy()}, labels, hooks="*", token_types=np.arange(300) % 7)
    chart = curve._repr_html_()
    assert "<i>" not in chart and "&lt;i&gt;" in chart
    assert len(curve.figure().data) >= 3 and len(result.figure().data) == 2


def test_bad_input_names_the_problem():
    x, y = _planted(n=40)
    with pytest.raises(nm.InputError, match="39 labels for 40 rows"):
        probe(x, y[:-1], control=False)
    with pytest.raises(nm.InputError, match="single class"):
        probe(x, np.zeros(40), control=False)
    with pytest.raises(nm.InputError, match="has 3 rows; 5-fold cross-validation needs at least 5"):
        probe(x, np.r_[np.zeros(37), np.ones(3)], control=False)
    with pytest.raises(nm.InputError, match="NaN"):
        probe(np.where(np.eye(40, 8) == 1, np.nan, x), y, control=False)
    with pytest.raises(nm.InputError, match="token_types="):
        probe(x, y)
    with pytest.raises(nm.InputError, match="kind must be one of"):
        probe(x, y, kind="svm", control=False)
    with pytest.raises(nm.InputError, match="no hook point matches"):
        probe_by_layer({"a": x}, y, hooks="blocks.*", control=False)
