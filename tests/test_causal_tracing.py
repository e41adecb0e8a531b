"""Causal tracing against the same noise and restoration done by hand with torch hooks, and on a known mechanism."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import make_model, tokens

SAMPLES, SUBJECT = 3, [[1, 2], [1, 2]]


def _by_hand(hf, prompts, answer, restore):
    """p(answer) per noise sample and prompt with the subject noised as `causal_trace` draws it, and `restore`
    (module → (position, clean output)) put back at one position of each restored module's output."""
    n, length = prompts.shape
    weight = hf.transformer.wte.weight
    noise = torch.randn(SAMPLES * n, length, weight.shape[1], generator=torch.Generator().manual_seed(0)) * 3 * weight.std()
    keep = torch.zeros(n, length, 1)
    keep[:, 1:3] = 1
    noise = noise * keep.repeat(SAMPLES, 1, 1)
    handles = [hf.transformer.wte.register_forward_hook(lambda m, a, o: o + noise)]
    for module, (position, clean) in restore.items():
        def put_back(m, a, o, position=position, clean=clean):
            o = o.clone()
            o[:, position] = clean[:, position].repeat(SAMPLES, 1)
            return o

        handles.append(module.register_forward_hook(put_back))
    try:
        with torch.no_grad():
            logits = hf(prompts.repeat(SAMPLES, 1)).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits.softmax(-1)[:, answer].reshape(SAMPLES, n)


def _outputs(hf, prompts, modules):
    seen = {}
    handles = [m.register_forward_hook(lambda mod, a, o, m=m: seen.__setitem__(m, o.clone())) for m in modules]
    with torch.no_grad():
        hf(prompts)
    for handle in handles:
        handle.remove()
    return seen


def test_each_restored_hidden_state_equals_the_noise_and_restoration_done_by_hand():
    hf = make_model("gpt2")
    model, prompts, answer = nm.load(hf), tokens(2, 6), 11
    blocks = list(hf.transformer.h)
    clean = _outputs(hf, prompts, blocks)
    result = nm.patching.causal_trace(model, prompts, SUBJECT, answer, samples=SAMPLES, progress=False)
    corrupted = _by_hand(hf, prompts, answer, {})
    assert result.corrupted == pytest.approx(corrupted.mean().item(), abs=1e-6)
    for layer, position in [(0, 0), (0, 2), (1, 3), (1, 5)]:
        restored = _by_hand(hf, prompts, answer, {blocks[layer]: (position, clean[blocks[layer]])})
        per_sample = (restored - corrupted).mean(1)
        torch.testing.assert_close(result.per_sample[layer, position], per_sample, rtol=0, atol=1e-5)
    assert result.values.shape == (2, 6) and result.labels[1][1].endswith("*")


def test_a_window_of_mlp_outputs_is_restored_together():
    hf = make_model("gpt2")
    model, prompts, answer = nm.load(hf), tokens(2, 6), 11
    mlps = [block.mlp for block in hf.transformer.h]
    clean = _outputs(hf, prompts, mlps)
    result = nm.patching.causal_trace(model, prompts, SUBJECT, answer, kind="mlp", window=2, samples=SAMPLES, progress=False)
    corrupted = _by_hand(hf, prompts, answer, {})
    # a window of 2 centred on layer 1 covers layers 0 and 1; on layer 0 it covers layer 0 only
    both = _by_hand(hf, prompts, answer, {m: (2, clean[m]) for m in mlps})
    first = _by_hand(hf, prompts, answer, {mlps[0]: (2, clean[mlps[0]])})
    torch.testing.assert_close(result.per_sample[1, 2], (both - corrupted).mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.per_sample[0, 2], (first - corrupted).mean(1), rtol=0, atol=1e-5)


def test_on_the_induction_model_the_answer_lives_where_the_mechanism_puts_it():
    model = nm.load("induction-2l")
    first = torch.tensor([49, 31, 266, 391, 351, 299, 135, 414, 192, 77])  # distinct tokens: one right continuation
    prompt = torch.cat([torch.tensor([2]), first, first[:5]])[None]  # ends on the second 351; induction says 299
    result = nm.patching.causal_trace(model, prompt, [[5, 6]], samples=5, progress=False)
    assert result.clean > 0.5 and result.corrupted < 0.05
    # after layer 0 the answer is at its first occurrence (position 6, where the previous-token head wrote "after
    # 351"); after layer 1 it is at the last position, which the induction head read it into
    assert result.values[0].argmax() == 6 and result.values[1].argmax() == 15
    assert result.values[0, 6] > 0.7 and result.values[1, 15] > 0.7
    assert result.values[0, [p for p in range(16) if p != 6]].abs().max() < 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(subject="nowhere"), r"needs a tokenizer: give its token positions"),
        (dict(subject=[[1], [9]]), r"subject positions \[9\] of prompt 1 are outside its 6 positions"),
        (dict(subject=[[1]]), r"1 subjects given for 2 prompts"),
        (dict(subject=SUBJECT, kind="heads"), r"kind must be one of"),
        (dict(subject=SUBJECT, samples=0), r"samples and window must be at least 1"),
    ],
)
def test_bad_causal_tracing_input_is_a_clear_error(kwargs, message):
    model = nm.load(make_model("gpt2"))
    with pytest.raises(nm.NeuronMapError, match=message):
        nm.patching.causal_trace(model, tokens(2, 6), progress=False, **kwargs)
    assert model.list_hooks() == []


def test_a_subject_given_as_text_is_found_among_the_tokens():
    model = nm.load("ioi")
    result = nm.patching.causal_trace(model, "When Mary and John went to the store, John gave a drink to", "Mary", samples=2, progress=False)
    marked = [label for label in result.labels[1] if label.endswith("*")]
    assert marked == ["2 Mary*"]
