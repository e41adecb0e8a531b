"""Tutorial 06's checkers: right answers pass, wrong ones get a specific hint without the answer, placeholders say
"not yet", `reveal=True` shows the answer, and each checker's plain-PyTorch reference equals NeuronMap's analysis on
the same inputs (`cka`, the probes' cross-validated accuracy, `logit_lens`, `direct_logit_attribution`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronmap as nm
from neuronmap.course import ch06
from neuronmap.course.feedback import PLACEHOLDER_HINT
from neuronmap.zoo.recipes import ioi, ioi_sae


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("ioi")


@pytest.fixture(scope="module")
def texts():
    return ioi_sae.texts(120, 3)


@pytest.fixture(scope="module")
def prompt():
    return ioi.heldout_prompts(1, seed=7)[0]


def last_line(capsys) -> str:
    """The last ✓/✗ line printed since the previous call."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("✓", "✗"))][-1]


def linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def test_linear_cka_reference_equals_nm_cka_and_the_checker_passes_the_feature_space_formula(model, texts, capsys):
    trace = model.run(texts[:30], capture=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    x = nm.analysis.as_matrix(trace, "blocks.0.hook_resid_post")
    y = nm.analysis.as_matrix(trace, "blocks.1.hook_resid_post")
    assert ch06._gram_cka(x, y) == pytest.approx(nm.analysis.cka(x, y), abs=1e-10)
    rotation, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64))
    assert ch06._gram_cka(x, 3 * x @ rotation) == pytest.approx(1.0, abs=1e-10)
    assert ch06.check_linear_cka(linear_cka, x, y)
    assert "centred-Gram formula" in last_line(capsys)


def test_linear_cka_hints_on_the_usual_mistakes(capsys):
    x, y = torch.randn(40, 6, dtype=torch.float64) + 2, torch.randn(40, 4, dtype=torch.float64) - 1
    assert not ch06.check_linear_cka(lambda x, y: (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()), x, y)
    assert "centres each feature" in last_line(capsys)
    assert not ch06.check_linear_cka(lambda x, y: linear_cka(x, y).sqrt(), x, y)
    assert "squared Frobenius norm" in last_line(capsys)
    assert not ch06.check_linear_cka(lambda x, y: (y.T @ x).norm() ** 2, x, y)
    assert "between 0 and 1" in last_line(capsys)
    assert not ch06.check_linear_cka(lambda x, y: torch.zeros(3), x, y)
    assert "one number" in last_line(capsys)
    assert not ch06.check_linear_cka(0.5, x, y)
    assert "function linear_cka" in last_line(capsys)
    assert not ch06.check_linear_cka(lambda x, y: ..., x, y)
    assert PLACEHOLDER_HINT in last_line(capsys)
    assert not ch06.check_linear_cka(..., x, y, reveal=True)
    assert "The answer: x, y = x - x.mean(0)" in capsys.readouterr().out


def test_probe_reference_agrees_with_probe_by_layer(model, texts):
    accuracy, baseline = ch06._probe_accuracies(model, texts, ioi.NAMES)
    trace = model.run(texts, capture=list(ch06.PROBE_HOOKS))
    points, _, _ = ch06._residual_points(model, texts)
    for hook in ch06.PROBE_HOOKS:  # the plain hooks read the same residual stream as NeuronMap's hook points
        assert torch.allclose(points[hook], nm.analysis.as_matrix(trace, hook, dtype=torch.float32), atol=1e-5)
    real = trace.attention_mask.bool()
    ids = trace.tokens[real]
    is_name = torch.isin(ids, torch.tensor(model.tokenizer.convert_tokens_to_ids(ioi.NAMES)))
    labels = []
    for row, mask in zip(trace.tokens.tolist(), real.tolist()):
        seen: set[int] = set()
        for token in [t for t, live in zip(row, mask) if live]:
            labels.append(token in seen)
            seen.add(token)
    labels = torch.tensor(labels)[is_name].long()
    rows = {hook: nm.analysis.as_matrix(trace, hook)[is_name] for hook in ch06.PROBE_HOOKS}
    curve = nm.analysis.probe_by_layer(rows, labels, list(ch06.PROBE_HOOKS), control=False)
    assert [accuracy[hook] for hook in ch06.PROBE_HOOKS] == pytest.approx(curve.accuracy, abs=1e-6)
    seen_share = float(labels.double().mean())
    assert baseline == pytest.approx(max(seen_share, 1 - seen_share), abs=1e-12)
    assert accuracy["blocks.0.hook_resid_pre"] < ch06.READABLE <= accuracy["blocks.0.hook_resid_mid"]


def test_first_readable_accepts_the_first_point_and_hints_otherwise(model, texts, capsys):
    assert ch06.check_first_readable("blocks.0.hook_resid_mid", model, texts, ioi.NAMES)
    assert "first point of the residual stream" in last_line(capsys)
    assert not ch06.check_first_readable("blocks.0.hook_resid_pre", model, texts, ioi.NAMES)
    assert "reaches only" in last_line(capsys)
    assert not ch06.check_first_readable("blocks.1.hook_resid_post", model, texts, ioi.NAMES)
    assert "already earlier" in last_line(capsys)
    assert not ch06.check_first_readable("blocks.2.hook_resid_post", model, texts, ioi.NAMES)
    assert "one of the hook names" in last_line(capsys)
    assert not ch06.check_first_readable(..., model, texts, ioi.NAMES, reveal=True)
    out = capsys.readouterr().out
    assert PLACEHOLDER_HINT in out and "The answer: blocks.0.hook_resid_mid (accuracies:" in out


def test_lens_reference_is_the_model_output_at_the_last_block_and_nm_logit_lens_before(model, prompt, capsys):
    hf = model.module
    encoded = model.tokenizer(prompt["prompt"], return_tensors="pt")
    outputs = ch06._inputs_of(hf, ch06._block_output_readers(hf), **encoded)
    with torch.no_grad():
        logits = hf(**encoded).logits[0]
        lensed = [hf.lm_head(hf.transformer.ln_f(resid[0])) for resid in outputs.values()]
    assert torch.allclose(lensed[-1], logits, atol=1e-5)
    lens = nm.analysis.logit_lens(model, prompt["prompt"])
    for layer, reading in enumerate(lensed):
        assert torch.allclose(lens.logprobs[lens.layers.index(str(layer))], reading.log_softmax(-1), atol=1e-4)

    W_U, b_U = model.weights.W_U, model.weights.b_U
    assert ch06.check_lens(lambda r: hf.transformer.ln_f(r) @ W_U + b_U, model, prompt["prompt"])
    assert "after each of the 2 blocks" in last_line(capsys)
    assert ch06.check_lens(lambda r: (hf.transformer.ln_f(r) @ W_U).log_softmax(-1), model, prompt["prompt"])
    assert not ch06.check_lens(lambda r: r @ W_U + b_U, model, prompt["prompt"])
    assert "final LayerNorm" in last_line(capsys)
    assert not ch06.check_lens(lambda r: (hf.transformer.ln_f(r) @ W_U).softmax(-1), model, prompt["prompt"])
    assert "probabilities" in last_line(capsys)
    assert not ch06.check_lens(lambda r: r, model, prompt["prompt"])
    assert "[positions, vocab]" in last_line(capsys)
    assert not ch06.check_lens(lambda r: hf.transformer.ln_f(r) @ W_U.flip(1), model, prompt["prompt"])
    assert "not the logits" in last_line(capsys)
    assert not ch06.check_lens(lambda r: ..., model, prompt["prompt"])
    assert PLACEHOLDER_HINT in last_line(capsys)


def test_head_effect_reference_equals_direct_logit_attribution(model, prompt):
    dla = nm.analysis.direct_logit_attribution(model, prompt["prompt"], prompt["io"], wrong=prompt["s"])
    by_label = dict(zip(dla.labels, dla.values.tolist()))
    for layer in range(2):
        for head in range(4):
            parts = ch06._head_effect_parts(model, prompt, layer, head)
            assert parts["effect"] == pytest.approx(by_label[f"L{layer}H{head}"], abs=1e-4)


def test_head_effect_passes_the_right_number_and_names_each_mistake(model, prompt, capsys):
    parts = ch06._head_effect_parts(model, prompt, 1, 2)
    assert ch06.check_head_effect(parts["effect"], model, prompt, 1, 2)
    assert f"L1H2 writes {parts['effect']:+.3f}" in last_line(capsys)
    assert ch06.check_head_effect(torch.tensor(parts["effect"], dtype=torch.float32), model, prompt, 1, 2)
    for variant, hint in (("uncentred", "subtracts the mean"), ("unscaled", "divide by the final LayerNorm's scale"),
                          ("unweighted", "multiply by the final LayerNorm's weight"), ("with_bias", "b_O")):
        assert abs(parts[variant] - parts["effect"]) > 2e-3, variant  # each mistake is told apart from the answer
        assert not ch06.check_head_effect(parts[variant], model, prompt, 1, 2)
        assert hint in last_line(capsys)
    assert not ch06.check_head_effect(-parts["effect"], model, prompt, 1, 2)
    assert "sign is flipped" in last_line(capsys)
    assert not ch06.check_head_effect(0.0, model, prompt, 1, 2)
    assert "not the head's direct effect" in last_line(capsys)
    assert not ch06.check_head_effect("big", model, prompt, 1, 2)
    assert "one number" in last_line(capsys)
    assert not ch06.check_head_effect(..., model, prompt, 1, 2, reveal=True)
    out = capsys.readouterr().out
    assert PLACEHOLDER_HINT in out and f"The answer: {parts['effect']:+.4f}" in out
    assert np.isfinite(parts["scale"]) and parts["scale"] > 0
