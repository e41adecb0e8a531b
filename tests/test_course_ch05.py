"""Tutorial 05's checkers: right answers pass, wrong ones get a specific hint without the answer, placeholders say
"not yet", `reveal=True` shows the answer, and each checker's plain-PyTorch reference equals NeuronMap's SAE code on
the same inputs (the SAE's encode, `nm.sae.evaluate`'s CE loss recovered, splicing with interventions)."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.course import ch05
from neuronmap.course.feedback import PLACEHOLDER_HINT
from neuronmap.zoo.recipes import ioi, ioi_sae


@pytest.fixture(scope="module")
def model():
    return nm.zoo.load("ioi")


@pytest.fixture(scope="module")
def sae():
    return nm.zoo.load_sae("ioi-resid0")


@pytest.fixture(scope="module")
def texts():
    return ioi_sae.texts(40, 11)


def last_line(capsys) -> str:
    """The last ✓/✗ line printed since the previous call."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("✓", "✗"))][-1]


def test_encode_passes_the_sae_own_encoder_and_hints_on_the_usual_mistakes(sae, model, texts, capsys):
    assert ch05.check_encode(lambda x: sae.encode(x), sae, model, texts)
    assert "exactly 8 active" in last_line(capsys)

    def without_b_dec(x):
        pre = x @ sae.W_enc + sae.b_enc
        values, indices = pre.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    assert not ch05.check_encode(without_b_dec, sae, model, texts)
    assert "subtracts b_dec" in last_line(capsys)
    assert not ch05.check_encode(lambda x: ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu(), sae, model, texts)
    assert "at most k = 8" in last_line(capsys)
    assert not ch05.check_encode(lambda x: x, sae, model, texts)
    assert "[tokens, d_sae]" in last_line(capsys)
    assert not ch05.check_encode(lambda x: ..., sae, model, texts)
    assert PLACEHOLDER_HINT in last_line(capsys)


def test_ce_loss_recovered_reference_equals_evaluate(sae, model, texts, capsys):
    batch = texts[:16]
    metrics = nm.sae.evaluate(sae, model, batch, batch_size=16, progress=False)
    assert ch05.check_ce_loss_recovered(metrics.ce_loss_recovered, sae, model, batch)
    assert last_line(capsys).startswith("✓ Correct: CE loss recovered")
    assert not ch05.check_ce_loss_recovered(1 - metrics.ce_loss_recovered, sae, model, batch)
    assert "does not recover" in last_line(capsys)
    assert not ch05.check_ce_loss_recovered(1.7, sae, model, batch, reveal=True)
    out = capsys.readouterr().out
    assert "between 0" in out and f"= {metrics.ce_loss_recovered:.4f}" in out
    assert not ch05.check_ce_loss_recovered("high", sae, model, batch)
    assert "one number" in last_line(capsys)


def test_word_latent_accepts_the_card_latent_and_refuses_another(sae, model, texts, capsys):
    card = nm.zoo.card("ioi-resid0")["roles"]
    assert ch05.check_word_latent(card["object"]["latent"], sae, model, texts, ioi.OBJECTS)
    assert not ch05.check_word_latent(card["to before a name"]["latent"], sae, model, texts, ioi.OBJECTS)
    assert "another has much more" in last_line(capsys)
    assert not ch05.check_word_latent(10_000, sae, model, texts, ioi.OBJECTS)
    assert "latent index" in last_line(capsys)


def test_word_latent_reference_is_the_f1_of_spliced_captures(sae, model, texts):
    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    tokens = model.to_tokens(texts)
    real = tokens != model.tokenizer.pad_token_id
    fired = model.run(texts, saes=[sae], use_error_term=True, capture=name)[name][real] > 0
    truth = torch.isin(tokens[real], torch.tensor(model.tokenizer.convert_tokens_to_ids(ioi.OBJECTS)))
    tp = (fired & truth[:, None]).sum(0).double()
    expected = 2 * tp / (fired.sum(0) + truth.sum())
    assert torch.allclose(ch05._f1_against_words(sae, model, texts, ioi.OBJECTS), expected, atol=1e-9)


def test_important_latent_reference_equals_ablation_through_the_sae_hook(sae, model, capsys):
    prompts = ioi.heldout_prompts(16, seed=5)
    effects = ch05._ablation_effects(sae, model, prompts)
    texts = [p["prompt"] for p in prompts]
    ids = model.tokenizer.convert_tokens_to_ids
    io, s = torch.tensor([ids(p["io"]) for p in prompts]), torch.tensor([ids(p["s"]) for p in prompts])
    last = (model.to_tokens(texts) != model.tokenizer.pad_token_id).sum(1) - 1
    rows = torch.arange(len(prompts))

    def logit_diff(logits):
        final = logits[rows, last]
        return float((final[rows, io] - final[rows, s]).mean())

    name = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    base = logit_diff(model.run(texts).logits)
    for latent in sorted(effects, key=effects.get)[:3]:
        def ablate(acts, hook, latent=latent):
            acts[..., latent] = 0

        ablated = model.run(texts, saes=[sae], use_error_term=True, interventions={name: ablate}).logits
        assert logit_diff(ablated) - base == pytest.approx(effects[latent], abs=1e-4)
    best = min(effects, key=effects.get)
    assert ch05.check_important_latent(best, sae, model, prompts)
    worst = max(effects, key=effects.get)
    assert not ch05.check_important_latent(worst, sae, model, prompts)
    line = last_line(capsys)
    assert "raises the logit difference" in line or "lowers it more" in line
    silent = next(i for i in range(sae.cfg.d_sae) if i not in effects)
    assert not ch05.check_important_latent(silent, sae, model, prompts)
    assert "never fires" in last_line(capsys)
