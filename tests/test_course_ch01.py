"""Tutorial 01's checkers accept right answers, hint at what is wrong with wrong ones, reveal the answer only when
asked, and take an untouched exercise (`...`) without an exception (on a tiny GPT-2 and the zoo's MiniLM)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import neuronmap as nm
from neuronmap.course import ch01
from neuronmap.course.feedback import PLACEHOLDER_HINT

SENTENCES = ["The cat sat on the mat.", "A kitten rested on the rug."]
CLEAN, CORRUPTED, PROBE = "The cat chased the mouse.", "The car chased the mouse.", "A kitten hunted a small rodent."
LAYER = 3


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=16, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return nm.load(transformers.GPT2LMHeadModel(config))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def components(gpt2, tokens):
    trace = gpt2.run(tokens, capture=["hook_embed", "hook_pos_embed", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out"])
    embeddings = trace["hook_embed"] + trace["hook_pos_embed"]
    blocks = sum(trace[f"blocks.{layer}.hook_{part}"] for layer in range(2) for part in ("attn_out", "mlp_out"))
    return embeddings, blocks, trace["hook_pos_embed"]


@pytest.fixture(scope="module")
def minilm():
    return nm.zoo.load("minilm")


def _similarity(trace, second: torch.Tensor | None = None) -> float:
    hidden = trace.output.last_hidden_state
    mask = trace.attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.cosine_similarity(pooled[0], pooled[1] if second is None else second, dim=0).item()


@pytest.fixture(scope="module")
def head_changes(minilm):
    base = _similarity(minilm.run(SENTENCES))
    changes = []
    for head in range(minilm.module.config.num_attention_heads):
        def ablate(z, hook, head=head):
            z[:, :, head] = 0.0

        changes.append(_similarity(minilm.run(SENTENCES, interventions={f"blocks.{LAYER}.attn.hook_z": ablate})) - base)
    return changes


def test_the_residual_sum(gpt2, tokens, components, capsys):
    embeddings, blocks, positions = components
    assert ch01.check_residual_sum(embeddings + blocks, gpt2, tokens)
    assert not ch01.check_residual_sum(embeddings - positions + blocks, gpt2, tokens)
    assert "positional embeddings (hook_pos_embed) are missing" in capsys.readouterr().out


def test_a_wrong_residual_sum_gets_a_hint_not_the_recipe(gpt2, tokens, components, capsys):
    embeddings, blocks, _ = components
    assert not ch01.check_residual_sum(embeddings, gpt2, tokens)
    hint = capsys.readouterr().out
    assert "differs from blocks.1.hook_resid_post" in hint and "reveal=True" in hint
    assert "hook_attn_out" not in hint
    assert not ch01.check_residual_sum(embeddings, gpt2, tokens, reveal=True)
    assert "The answer: hook_embed + hook_pos_embed + the sum, over every block L" in capsys.readouterr().out


def test_the_most_important_head_gets_a_hint_then_the_answer(minilm, head_changes, capsys):
    best = max(range(len(head_changes)), key=lambda h: abs(head_changes[h]))
    assert ch01.check_most_important_head(best, minilm, SENTENCES, LAYER)
    assert f"{head_changes[best]:+.3f}" in capsys.readouterr().out
    wrong = min(range(len(head_changes)), key=lambda h: abs(head_changes[h]))
    assert not ch01.check_most_important_head(wrong, minilm, SENTENCES, LAYER)
    hint = capsys.readouterr().out
    assert f"ablating head {wrong} of layer {LAYER}" in hint and "change it more" in hint
    assert f"head {best}" not in hint and f"{head_changes[best]:+.3f}" not in hint
    assert not ch01.check_most_important_head(wrong, minilm, SENTENCES, LAYER, reveal=True)
    assert f"The answer: head {best}: ablating it changes the similarity by {head_changes[best]:+.3f}" in capsys.readouterr().out


def test_patched_similarity(minilm, capsys):
    clean_trace = minilm.run(CLEAN, capture="blocks.*.hook_resid_post")
    probe = minilm.run(PROBE).output.last_hidden_state.mean(1)[0]

    def patched_similarity(layer, position):
        name = f"blocks.{layer}.hook_resid_post"

        def patch(activation, hook):
            activation[:, position] = clean_trace[name][:, position]

        return _similarity(minilm.run(CORRUPTED, interventions={name: patch}), probe)

    def unpatched_similarity(layer, position):
        return _similarity(minilm.run(CORRUPTED), probe)

    assert ch01.check_patched_similarity(patched_similarity, minilm, CLEAN, CORRUPTED, PROBE)
    assert not ch01.check_patched_similarity(unpatched_similarity, minilm, CLEAN, CORRUPTED, PROBE)
    hint = capsys.readouterr().out.splitlines()[-1]
    assert "the patch had no effect" in hint and "reveal=True" in hint
    assert not ch01.check_patched_similarity(unpatched_similarity, minilm, CLEAN, CORRUPTED, PROBE, reveal=True)
    assert "The answer: run `corrupted` with interventions=" in capsys.readouterr().out


def test_an_untouched_exercise_is_not_yet_started(gpt2, tokens, minilm, capsys):
    def patched_similarity(layer, position): ...

    calls = [
        lambda **kw: ch01.check_residual_sum(..., gpt2, tokens, **kw),
        lambda **kw: ch01.check_most_important_head(None, minilm, SENTENCES, LAYER, **kw),
        lambda **kw: ch01.check_patched_similarity(patched_similarity, minilm, CLEAN, CORRUPTED, PROBE, **kw),
        lambda **kw: ch01.check_patched_similarity(..., minilm, CLEAN, CORRUPTED, PROBE, **kw),
    ]
    for call in calls:
        assert call() is False
        out = capsys.readouterr().out
        assert out.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}") and out.count("\n") == 1
        assert call(reveal=True) is False
        assert "The answer: " in capsys.readouterr().out
