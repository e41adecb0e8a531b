"""`model.generate`: the model's own generation with the KV cache on, interventions applied at every step, equal to
a greedy loop of full, cache-free forward passes with the same interventions."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import make_model
from neuronmap.zoo.recipes import induction

NEW = 8


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("induction-2l")


@pytest.fixture(scope="module")
def prompt():
    words = induction.vocabulary()[10:22]
    return " ".join(words + words[:4])  # the model continues the repeat by induction


def greedy_by_hand(model, tokens: torch.Tensor, interventions: dict, steps: int = NEW) -> torch.Tensor:
    """Append the argmax token `steps` times, recomputing the whole sequence each time (no cache)."""
    for _ in range(steps):
        logits = model.run(tokens, interventions=interventions).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def steer(resid, hook):
    return resid + STEERING


STEERING = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 3


def halve_head(pattern, hook):
    pattern[:, 2] = pattern[:, 2] * 0.5  # [batch, head, query, key]: under the cache, query is the new token only


def zero_heads(z, hook):
    z[:, :, [0, 1]] = 0


@pytest.mark.parametrize(
    "interventions",
    [{}, {"blocks.0.hook_resid_post": steer}, {"blocks.1.attn.hook_pattern": halve_head}, {"blocks.0.attn.hook_z": zero_heads}],
    ids=["none", "steering", "pattern", "ablation"],
)
def test_generation_with_the_cache_equals_full_forwards_with_the_same_interventions(model, prompt, interventions):
    tokens = model.to_tokens(prompt)
    generated = model.generate(tokens, NEW, interventions=interventions)
    assert torch.equal(generated, greedy_by_hand(model, tokens, interventions))
    assert model.list_hooks() == [] and model.module.config._attn_implementation == "sdpa"


def test_interventions_do_change_what_is_generated(model, prompt):
    tokens = model.to_tokens(prompt)
    clean = model.generate(tokens, NEW)
    assert not torch.equal(model.generate(tokens, NEW, interventions={"blocks.0.hook_resid_post": steer}), clean)
    assert not torch.equal(model.generate(tokens, NEW, interventions={"blocks.0.attn.hook_z": zero_heads}), clean)
    words = prompt.split()
    assert model.to_str_tokens(clean[0, -NEW:])[:4] == words[4:8]  # induction continues the repeat


def test_hooks_attached_with_model_hooks_apply_during_generation(model, prompt):
    tokens = model.to_tokens(prompt)
    with model.hooks({"blocks.0.hook_resid_post": steer}):
        inside = model.generate(tokens, NEW)
    assert torch.equal(inside, model.generate(tokens, NEW, interventions={"blocks.0.hook_resid_post": steer}))


def test_text_in_gives_the_prompt_and_its_continuation(model, prompt):
    text = model.generate(prompt, NEW)
    ids = model.generate(model.to_tokens(prompt), NEW)
    assert text == model.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    assert text.startswith(prompt) and len(text.split()) == len(prompt.split()) + NEW


def test_a_batch_of_prompts_is_left_padded_and_each_continues_as_it_would_alone(model, prompt):
    short = " ".join(prompt.split()[:9])
    together = model.generate([prompt, short], NEW)
    assert together == [model.generate(prompt, NEW), model.generate(short, NEW)]


def test_generation_past_the_context_or_without_a_head_is_refused(model, prompt):
    with pytest.raises(nm.InputError, match="17 input tokens \\+ 60 new ones exceed the model's context of 64 tokens"):
        model.generate(prompt, 60)
    with pytest.raises(nm.InputError, match="max_new_tokens must be a positive int"):
        model.generate(prompt, 0)
    with pytest.raises(nm.InputError, match="language-model head"):
        nm.load(torch.nn.Linear(2, 2)).generate(torch.zeros(1, 2, dtype=torch.long))
    assert model.list_hooks() == []


def test_an_intervention_that_fails_at_a_cached_step_is_named(model, prompt):
    tokens = model.to_tokens(prompt)
    full = model.run(tokens, capture="blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    with pytest.raises(nm.InterventionError, match=r"blocks\.0\.hook_resid_post.*shape \[1, 17, 128\].*expected \[1, 1, 128\]"):
        model.generate(tokens, NEW, interventions={"blocks.0.hook_resid_post": full})
    assert model.list_hooks() == []


def test_generation_on_other_families_keeps_logits_of_the_cache_free_loop():
    for family in ("gpt_neox", "llama"):
        model = nm.load(make_model(family))
        tokens = torch.tensor([[3, 5, 7, 9, 4]])
        interventions = {"blocks.1.hook_mlp_out": lambda out, hook: out * 0.5}
        assert torch.equal(model.generate(tokens, 5, interventions=interventions), greedy_by_hand(model, tokens, interventions, 5))
