"""The tuned lens against hand computations: the translator by hand, KL from the model's own logits and a by-hand final
LayerNorm + unembedding, the logit lens it starts as, save/load, store vs texts, determinism, views and errors."""

from __future__ import annotations

import json

import pytest
import torch

import neuronmap as nm
from conftest import make_model, tokens
from neuronmap.analysis.lenses import logit_lens
from neuronmap.analysis.tuned_lens import LensKL, TunedLens, TunedLensError, lens_kl, train_tuned_lens, tuned_lens
from neuronmap.zoo.recipes import ioi_sae

PROMPT = "When Mary and John went to the store, John gave a drink to"
HOOKS = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]  # embed and block 0 (block 1 is the last layer)
TRAINING = dict(hooks=HOOKS, steps=60, lr=1e-2, batch_size=256, progress=False)


@pytest.fixture(scope="module")
def ioi():
    return nm.load("ioi")


@pytest.fixture(scope="module")
def texts():
    """The ioi model's own training distribution: texts to train on, and held-out texts from another seed."""
    return ioi_sae.texts(300, seed=11), ioi_sae.texts(120, seed=12)


@pytest.fixture(scope="module")
def trained(ioi, texts):
    return train_tuned_lens(ioi, texts[0], **TRAINING)


def _by_hand(model, stream: torch.Tensor) -> torch.Tensor:
    """Log-probs of residual streams `[..., d_model]` through GPT-2's final LayerNorm and unembedding, by hand."""
    ln = model.module.transformer.ln_f
    x = stream.double()
    x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    x = x * ln.weight.detach().double() + ln.bias.detach().double()
    return torch.log_softmax(x @ model.module.lm_head.weight.detach().double().T, -1)


def _translate_by_hand(lens: TunedLens, index: int, stream: torch.Tensor) -> torch.Tensor:
    A, b = lens.weight[index].double(), lens.bias[index].double()
    return torch.stack([h + A @ h + b for h in stream.double()])


def _hand_kl(model, texts: list[str], lens: TunedLens) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(final ‖ lens) `[hook, token]` for the logit lens and the tuned lens, from the model's own logits
    (torch.kl_div) and the lens read out through the by-hand LayerNorm + unembedding."""
    trace = model.run(texts, capture=lens.hooks)
    real = trace.attention_mask.bool()
    final = trace.logits[real].double().log_softmax(-1)
    logit, tuned = [], []
    for i, hook in enumerate(lens.hooks):
        stream = trace[hook][real]
        for out, lensed in ((logit, stream), (tuned, _translate_by_hand(lens, i, stream))):
            kl = torch.nn.functional.kl_div(_by_hand(model, lensed), final, log_target=True, reduction="none")
            out.append(kl.sum(-1))
    return torch.stack(logit), torch.stack(tuned)


@pytest.mark.parametrize("name", ["ioi", "induction-2l", "llama"])
def test_an_untrained_tuned_lens_is_exactly_the_logit_lens(name):
    model = nm.load(make_model("llama")) if name == "llama" else nm.load(name)
    prompt = PROMPT if name == "ioi" else tokens(batch=1)[0]
    untrained = TunedLens.identity(model, HOOKS)
    seen = tuned_lens(model, prompt, untrained)
    assert torch.equal(seen.logprobs, logit_lens(model, prompt).logprobs)
    assert seen.method == "tuned lens" and seen.layers == ["embed", "0", "1"]
    assert model.list_hooks() == []


def test_the_translator_is_h_plus_A_h_plus_b_before_the_final_norm_and_unembedding(ioi):
    lens = TunedLens.identity(ioi, HOOKS)
    generator = torch.Generator().manual_seed(0)
    lens.weight = torch.randn(lens.weight.shape, generator=generator) * 0.05
    lens.bias = torch.randn(lens.bias.shape, generator=generator)
    seen = tuned_lens(ioi, PROMPT, lens, positions=[3, -1])
    trace = ioi.run(PROMPT, capture=lens.hooks + ["blocks.1.hook_resid_post"])
    for i, hook in enumerate(lens.hooks):
        stream = trace[hook][0, [3, -1]]
        assert torch.allclose(lens.translate(hook, stream).double(), _translate_by_hand(lens, i, stream), atol=1e-5)
        assert torch.allclose(seen.logprobs[i].double(), _by_hand(ioi, _translate_by_hand(lens, i, stream)), atol=1e-4)
    # The last layer has no translator: it is the model's own output.
    assert torch.allclose(seen.logprobs[-1], trace.logits[0, [3, -1]].log_softmax(-1), atol=1e-5)


def test_the_trained_lens_has_lower_kl_than_the_logit_lens_at_every_layer_on_held_out_texts(ioi, texts, trained):
    logit, tuned = _hand_kl(ioi, texts[1], trained)
    assert (tuned.mean(1) < logit.mean(1)).all()
    assert (tuned.mean(1) < 0.5 * logit.mean(1)).all()  # not a marginal gain: the translators learned something
    measured = lens_kl(ioi, texts[1], trained)
    assert measured.methods == ["logit lens", "tuned lens"] and measured.layers == ["embed", "0"]
    assert measured.tokens == logit.shape[1]
    expected = torch.stack([logit.mean(1), tuned.mean(1)]).numpy()
    assert measured.to_numpy() == pytest.approx(expected, rel=1e-4)
    errors = torch.stack([logit.std(1), tuned.std(1)]).numpy() / logit.shape[1] ** 0.5
    assert measured.se == pytest.approx(errors, rel=1e-3)
    alone = lens_kl(ioi, texts[1], hooks="blocks.0.hook_resid_post")
    assert alone.methods == ["logit lens"] and alone.to_numpy()[0] == pytest.approx([expected[0, 1]], rel=1e-4)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_rotary_families_train_and_read_through_their_own_norm(family):
    model = nm.load(make_model(family))
    generator = torch.Generator().manual_seed(0)
    train = torch.randint(0, 28, (40, 16), generator=generator)
    held = torch.randint(0, 28, (6, 16), generator=generator)
    lens = train_tuned_lens(model, train, **{**TRAINING, "steps": 40, "batch_size": 128})
    measured = lens_kl(model, held, lens)
    assert (measured.mean[1] < measured.mean[0]).all()
    # The same KL from the model's own logits and the (tested) logit lens / tuned lens views, prompt by prompt.
    per_token = {"logit lens": [], "tuned lens": []}
    for row in held:
        final = model.run(row[None]).logits[0].double().log_softmax(-1)
        for method, view in (("logit lens", logit_lens(model, row)), ("tuned lens", tuned_lens(model, row, lens))):
            per_token[method].append(torch.stack([
                torch.nn.functional.kl_div(view.logprobs[i].double(), final, log_target=True, reduction="none").sum(-1)
                for i in range(2)]))
    expected = torch.stack([torch.cat(per_token[m], 1).mean(1) for m in ("logit lens", "tuned lens")]).numpy()
    assert measured.to_numpy() == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_save_and_load_round_trip_bit_identically(ioi, trained, tmp_path):
    trained.save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]
    loaded = TunedLens.load(tmp_path / "lens", ioi)
    assert torch.equal(loaded.weight, trained.weight) and torch.equal(loaded.bias, trained.bias)
    assert loaded.hooks == trained.hooks and loaded.training == trained.training
    assert torch.equal(tuned_lens(ioi, PROMPT, loaded).logprobs, trained(ioi, PROMPT).logprobs)
    description = json.loads((tmp_path / "lens" / "tuned_lens.json").read_text())
    assert description["model_name"] == "ioi" and description["d_model"] == 128
    assert description["hooks"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]


def test_training_on_a_store_equals_training_on_the_same_texts(ioi, texts, tmp_path):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    store = nm.extract(ioi, texts[0][:100], hooks, tmp_path / "acts.h5", dtype=torch.float32, progress=False)
    settings = {**TRAINING, "steps": 20}
    from_store = train_tuned_lens(ioi, store, **settings)
    from_texts = train_tuned_lens(ioi, texts[0][:100], **settings)
    assert from_store.training["tokens"] == from_texts.training["tokens"] == len(store)
    assert torch.allclose(from_store.weight, from_texts.weight, atol=1e-6)
    assert torch.allclose(from_store.bias, from_texts.bias, atol=1e-6)
    by_path = train_tuned_lens(ioi, str(tmp_path / "acts.h5"), **settings)
    assert torch.equal(by_path.weight, from_store.weight)


def test_the_same_seed_trains_the_same_lens_bit_for_bit(ioi, texts):
    settings = {**TRAINING, "steps": 15, "batch_size": 64}
    first = train_tuned_lens(ioi, texts[0][:60], seed=3, **settings)
    again = train_tuned_lens(ioi, texts[0][:60], seed=3, **settings)
    other = train_tuned_lens(ioi, texts[0][:60], seed=4, **settings)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)
    assert ioi.list_hooks() == []
    assert all(p.grad is None for p in ioi.module.parameters())  # no gradient reached the model


def test_views_render_and_escape(ioi, texts, trained):
    seen = trained(ioi, PROMPT, positions="last")
    assert repr(seen).startswith("LogitLens(tuned lens: 3 layers") and "tuned lens" in seen.figure().layout.title.text
    assert 'aria-label="tuned lens"' in seen._repr_html_()
    page = trained._repr_html_()
    assert "blocks.0.hook_resid_pre" in page and "‖A‖_F" in page and repr(trained).startswith("TunedLens(trained")
    result = lens_kl(ioi, texts[1][:20], trained)
    assert isinstance(result, LensKL) and "<svg" in result._repr_html_()
    result.layers = ["<script>x</script>", "0"]
    assert "<script>x" not in result._repr_html_() and "&lt;script&gt;" in result._repr_html_()
    figure = result.figure()
    assert [t.name for t in figure.data if t.name] == ["logit lens", "tuned lens"]


def test_bad_input_raises_neuronmap_errors(ioi, texts, trained, tmp_path):
    with pytest.raises(nm.HookNameError, match="did you mean"):
        train_tuned_lens(ioi, texts[0][:5], hooks="blocks.0.hook_resid_pots", progress=False)
    with pytest.raises(nm.InputError, match="not 'blocks.0.hook_mlp_out'"):
        train_tuned_lens(ioi, texts[0][:5], hooks="blocks.0.hook_mlp_out", progress=False)
    with pytest.raises(nm.InputError, match="only the last layer"):
        train_tuned_lens(ioi, texts[0][:5], hooks="blocks.1.hook_resid_post", progress=False)
    with pytest.raises(nm.InputError, match="steps"):
        train_tuned_lens(ioi, texts[0][:5], steps=0, progress=False)
    with pytest.raises(TunedLensError, match="loss is nan at step 1") as caught:
        train_tuned_lens(ioi, texts[0][:5], hooks=HOOKS, lr=1e30, steps=3, progress=False)  # step 1 overflows
    assert caught.value.step == 1 and isinstance(caught.value, nm.NeuronMapError)
    store = nm.extract(ioi, texts[0][:5], "blocks.0.hook_resid_post", tmp_path / "one.h5", progress=False)
    with pytest.raises(nm.InputError, match="lacks blocks.0.hook_resid_pre, blocks.1.hook_resid_post"):
        train_tuned_lens(ioi, store, hooks=HOOKS, progress=False)
    induction = nm.load("induction-2l")
    with pytest.raises(TunedLensError, match="model 'ioi', not 'induction-2l'"):
        tuned_lens(induction, torch.arange(5), trained)
    wide = nm.load(make_model("gpt2"))
    with pytest.raises(TunedLensError, match="d_model 128, not"):
        lens_kl(wide, tokens(batch=2), trained)
    trained.save(tmp_path / "lens")
    with pytest.raises(TunedLensError, match="made for another model"):
        TunedLens.load(tmp_path / "lens", induction)
    with pytest.raises(TunedLensError, match="holds no tuned lens: tuned_lens.safetensors is missing"):
        TunedLens.load(tmp_path)
    weights = tmp_path / "lens" / "tuned_lens.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TunedLensError, match="SHA-256"):
        TunedLens.load(tmp_path / "lens")
    with pytest.raises(nm.InputError, match="must be a TunedLens"):
        tuned_lens(ioi, PROMPT, "lens/")
    assert ioi.list_hooks() == [] and induction.list_hooks() == []
