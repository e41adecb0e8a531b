"""Tutorial 03's checkers: right answers pass, wrong ones get a specific hint without the answer, placeholders say
"not yet", `reveal=True` shows the answer, and each checker's reference equals NeuronMap's patching on the same
prompts (an independent computation: the checkers use plain torch hooks on the HF modules)."""

from __future__ import annotations

import re

import pytest
import torch

import neuronmap as nm
from neuronmap.course import ch03
from neuronmap.course.feedback import PLACEHOLDER_HINT
from neuronmap.zoo.recipes import ioi

TEMPLATE = ioi.HELDOUT_TEMPLATES[0]


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("ioi")


@pytest.fixture(scope="module")
def prompts():
    chosen = [p for p in ioi.heldout_prompts(200, seed=7) if p["template"] == TEMPLATE][:12]
    assert len(chosen) == 12
    return chosen


@pytest.fixture(scope="module")
def clean(prompts):
    return [p["prompt"] for p in prompts]


@pytest.fixture(scope="module")
def corrupt(prompts):
    return [ioi.flipped(p) for p in prompts]


@pytest.fixture(scope="module")
def ids(model, prompts):
    to_id = model.tokenizer.convert_tokens_to_ids
    return torch.tensor([to_id(p["io"]) for p in prompts]), torch.tensor([to_id(p["s"]) for p in prompts])


@pytest.fixture(scope="module")
def metric(prompts):
    return nm.patching.logit_diff([" " + p["io"] for p in prompts], [" " + p["s"] for p in prompts])


@pytest.fixture(scope="module")
def positions(model, clean, corrupt):
    """(S2, the final position): where the clean and corrupted prompts differ, and the last token."""
    a, b = model.to_str_tokens(clean[0]), model.to_str_tokens(corrupt[0])
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a) - 1


@pytest.fixture(scope="module")
def mean_logit_diff(ids):
    io, s = ids

    def mean_logit_diff(trace):
        last = trace.logits[:, -1]
        rows = torch.arange(len(last))
        return (last[rows, io] - last[rows, s]).mean().item()

    return mean_logit_diff


def _patcher(model, clean, corrupt, mean_logit_diff, hook="resid_post", noise=False):
    """patched_logit_diff(layer, position) written with NeuronMap interventions, optionally the wrong way round."""
    source, target = (corrupt, clean) if noise else (clean, corrupt)

    def patched_logit_diff(layer, position):
        name = f"blocks.{layer}.hook_{hook}"
        recorded = model.run(source, capture=name)[name]

        def patch(activation, hook):
            activation[:, position] = recorded[:, position]
            return activation

        return mean_logit_diff(model.run(target, interventions={name: patch}))

    return patched_logit_diff


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d{4}", text)]


# exercise 1 ------------------------------------------------------------------------------------------------------


def test_the_mean_logit_difference_passes(model, prompts, mean_logit_diff, capsys):
    assert ch03.check_mean_logit_diff(mean_logit_diff, model, prompts)
    assert capsys.readouterr().out.startswith("✓ Correct: ")


def test_the_mean_logit_difference_reference_is_a_plain_forward_and_nm_patchs(model, prompts, clean, corrupt, ids, metric, capsys):
    io, s = ids
    rows = torch.arange(len(io))
    with torch.no_grad():
        last = model.module(**model.tokenizer(clean, return_tensors="pt")).logits[:, -1]
    by_hand = (last[rows, io] - last[rows, s]).mean().item()
    assert not ch03.check_mean_logit_diff(lambda trace: 0.0, model, prompts)
    out = capsys.readouterr().out
    assert "on the clean prompts mean_logit_diff gave 0.0000, expected" in out
    expected = _numbers(out)[1]
    assert expected == pytest.approx(by_hand, abs=1e-4)
    assert expected == pytest.approx(nm.patch(model, clean, corrupt, metric, "z", "layer_head", progress=False).clean, abs=1e-4)


def test_a_logit_difference_that_ignores_its_trace_or_has_the_wrong_sign_gets_a_hint(model, prompts, mean_logit_diff, capsys):
    assert not ch03.check_mean_logit_diff(lambda trace: 1.0, model, prompts)
    assert "same number for both runs: compute it from the trace" in capsys.readouterr().out
    assert not ch03.check_mean_logit_diff(lambda trace: -mean_logit_diff(trace), model, prompts)
    assert "that is logit(S) - logit(IO)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        ("per_prompt", "one per prompt: return their mean"),
        ("probabilities", "difference of probabilities"),
        ("second_to_last", "second-to-last position"),
        ("not_a_function", "should be the function mean_logit_diff(trace)"),
    ],
)
def test_a_wrong_logit_difference_gets_a_hint_not_the_answer(wrong, hint, model, prompts, ids, capsys):
    io, s = ids
    rows = torch.arange(len(io))
    answers = {
        "per_prompt": lambda trace: trace.logits[rows, -1, io] - trace.logits[rows, -1, s],
        "probabilities": lambda trace: (
            trace.logits[:, -1].softmax(-1)[rows, io] - trace.logits[:, -1].softmax(-1)[rows, s]
        ).mean().item(),
        "second_to_last": lambda trace: (trace.logits[rows, -2, io] - trace.logits[rows, -2, s]).mean().item(),
        "not_a_function": 8.5,
    }
    assert not ch03.check_mean_logit_diff(answers[wrong], model, prompts)
    out = capsys.readouterr().out
    assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "The answer" not in out
    assert not ch03.check_mean_logit_diff(answers[wrong], model, prompts, reveal=True)
    assert "The answer: last = trace.logits[:, -1]" in capsys.readouterr().out


# exercise 2 ------------------------------------------------------------------------------------------------------


def test_a_patch_by_hand_passes_and_the_references_are_nm_patchs_cells(
    model, prompts, clean, corrupt, metric, positions, mean_logit_diff, capsys
):
    s2, end = positions
    assert ch03.check_patched_logit_diff(_patcher(model, clean, corrupt, mean_logit_diff), model, prompts)
    out = capsys.readouterr().out
    assert out.startswith("✓ Correct: ") and f"(0, {s2}), (1, {s2}), (1, {end})" in out
    sweep = nm.patch(model, clean, corrupt, metric, "resid_post", "layer_pos", progress=False)
    for layer, position in [(0, s2), (1, end), (0, 3)]:
        assert not ch03.check_patched_logit_diff(lambda layer, position: 100.0, model, prompts, cases=[(layer, position)])
        _, expected = _numbers(capsys.readouterr().out)
        assert expected == pytest.approx(sweep.raw[layer, position].item(), abs=1e-3)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        ("noise", "that is noising"),
        ("resid_pre", "patches the block's input, blocks.0.hook_resid_pre"),
        ("no_effect", "the unpatched corrupted run"),
        ("fraction", "fractions of the gap restored"),
        ("everywhere", "the clean run's value everywhere"),
    ],
)
def test_a_wrong_patch_gets_a_hint_not_the_answer(wrong, hint, model, prompts, clean, corrupt, mean_logit_diff, capsys):
    clean_value, corrupt_value = mean_logit_diff(model.run(clean)), mean_logit_diff(model.run(corrupt))
    right = _patcher(model, clean, corrupt, mean_logit_diff)
    answers = {
        "noise": _patcher(model, clean, corrupt, mean_logit_diff, noise=True),
        "resid_pre": _patcher(model, clean, corrupt, mean_logit_diff, hook="resid_pre"),
        "no_effect": lambda layer, position: corrupt_value,
        "fraction": lambda layer, position: (right(layer, position) - corrupt_value) / (clean_value - corrupt_value),
        "everywhere": lambda layer, position: clean_value,
    }
    assert not ch03.check_patched_logit_diff(answers[wrong], model, prompts)
    out = capsys.readouterr().out
    assert out.startswith("✗ Not yet: ") and hint in out and "reveal=True" in out and "The answer" not in out
    assert not ch03.check_patched_logit_diff(answers[wrong], model, prompts, reveal=True)
    assert "The answer: run `corrupt` with interventions=" in capsys.readouterr().out


def test_a_patch_returning_a_tensor_of_many_numbers_is_told_to_return_one(model, prompts, capsys):
    assert not ch03.check_patched_logit_diff(lambda layer, position: torch.zeros(3), model, prompts)
    assert "should return one number" in capsys.readouterr().out


# exercise 3 ------------------------------------------------------------------------------------------------------


def test_the_direct_heads_pass_and_their_shares_are_path_patchings(model, prompts, clean, corrupt, metric, capsys):
    path = nm.patching.path_patch(model, clean, corrupt, metric)
    shares = 1 - path.values
    torch.testing.assert_close(ch03._direct_shares(ch03._Pairs(model, prompts)), shares, rtol=0, atol=1e-4)
    direct = [(l, h) for l in range(shares.shape[0]) for h in range(shares.shape[1]) if shares[l, h] >= ch03.DIRECT_SHARE]
    assert direct == [(1, 2)]  # the card: L1H2's direct contribution to the logit difference is +7.23
    assert ch03.check_direct_heads(direct, model, prompts)
    assert f"the direct path of head 1.2 carries {shares[1, 2]:.0%} of the effect" in capsys.readouterr().out
    assert ch03.check_direct_heads((1, 2), model, prompts)  # one (layer, head) counts as a list of one
    capsys.readouterr()


def test_wrong_direct_heads_get_a_hint_not_the_answer(model, prompts, clean, corrupt, metric, capsys):
    assert not ch03.check_direct_heads([(1, 2), (0, 2)], model, prompts)  # 0.2 matters in the head sweep, not directly
    hint = capsys.readouterr().out
    assert "the direct path of head 0.2 carries" in hint and "goes through later layers" in hint and "1.2" not in hint
    path = nm.patching.path_patch(model, clean, corrupt, metric)
    cells = [(l, h) for l in range(2) for h in range(4)]
    for values_read_as_effects in (
        [(l, h) for l, h in cells if path.values[l, h] >= 0.1],  # every head
        [(l, h) for l, h in cells if path.values[l, h] > 0.9],  # every head but 1.2
    ):
        assert not ch03.check_direct_heads(values_read_as_effects, model, prompts)
        assert "a head's share of the effect is 1 - its value" in capsys.readouterr().out
    assert not ch03.check_direct_heads([], model, prompts)
    hint = capsys.readouterr().out
    assert "1 head whose direct path carries at least 10% of the effect is missing" in hint and "1.2" not in hint
    assert not ch03.check_direct_heads([(5, 0)], model, prompts)
    assert "there is no head 5.0" in capsys.readouterr().out
    assert not ch03.check_direct_heads("1.2", model, prompts)
    assert "should be a list of (layer, head) tuples" in capsys.readouterr().out
    assert not ch03.check_direct_heads([], model, prompts, reveal=True)
    assert "The answer: [(1, 2)]: the direct path of head 1.2 carries" in capsys.readouterr().out


# placeholders ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placeholder", [..., None])
@pytest.mark.parametrize(
    "check", [ch03.check_mean_logit_diff, ch03.check_patched_logit_diff, ch03.check_direct_heads], ids=lambda f: f.__name__
)
def test_a_placeholder_answer_is_not_yet_started(check, placeholder, model, prompts, capsys):
    assert check(placeholder, model, prompts) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}") and out.count("\n") == 1
    assert check(placeholder, model, prompts, reveal=True) is False
    assert "The answer: " in capsys.readouterr().out


@pytest.mark.parametrize("check", [ch03.check_mean_logit_diff, ch03.check_patched_logit_diff], ids=lambda f: f.__name__)
def test_a_function_whose_body_is_still_the_placeholder_is_not_yet_started(check, model, prompts, capsys):
    def unfinished(*args):
        ...  # YOUR ANSWER

    assert check(unfinished, model, prompts) is False
    assert capsys.readouterr().out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}")
