"""Training SAEs end to end: recovering known sparse directions, bit-for-bit reproducibility, training from a zoo
model's hook and from an activation store, checkpoints, divergence, and bad input."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

import neuronmap as nm
from neuronmap.errors import HookNameError, InputError, SAEError
from neuronmap.sae import SAE
from neuronmap.sae.history import COLUMNS, TrainingLog
from neuronmap.sae.training import train

HOOK = "blocks.0.hook_resid_post"
# small inputs are read more than once; the test of that warning catches it itself
pytestmark = pytest.mark.filterwarnings("ignore:the (inputs|store) hold.*:UserWarning")


def sparse_data(rows: int, d: int = 64, features: int = 128, active: int = 3, seed: int = 0):
    """Activations made of `features` random unit directions (always the same ones), `active` of them per row with
    magnitudes in [0.5, 2.5) (drawn from `seed`): the directions an SAE should find."""
    directions = torch.randn(features, d, generator=torch.Generator().manual_seed(1234))
    directions /= directions.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(rows, features, generator=g).argsort(-1)[:, :active]
    magnitudes = torch.rand(rows, active, generator=g) * 2 + 0.5
    return torch.zeros(rows, features).scatter(-1, chosen, magnitudes) @ directions, directions


@pytest.fixture(scope="module")
def synthetic():
    return sparse_data(200_000)


@pytest.fixture(scope="module")
def model():
    return nm.load("induction-2l")


def token_ids(documents: int, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (documents, length), generator=torch.Generator().manual_seed(seed))


def recovered(sae: SAE, directions: torch.Tensor) -> torch.Tensor:
    """For each true direction, the largest cosine similarity with a decoder row."""
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    return (directions @ rows.T).max(-1).values


def untrained_like(sae: SAE, seed: int = 0) -> SAE:
    """An SAE of the same shape as `sae`, freshly initialised from `seed` with b_dec at the data's mean-free zero."""
    cfg = sae.cfg
    return SAE(cfg.architecture, cfg.d_in, cfg.d_sae, k=cfg.k, seed=seed)


def mse(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(x) - x).pow(2).mean())


# --- learning ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture, settings", [
    ("standard", {"l1_coefficient": 1.0, "tokens": 400_000}),
    ("topk", {"k": 3, "tokens": 400_000}),
    ("batchtopk", {"k": 3, "tokens": 400_000}),
    ("jumprelu", {"l0_coefficient": 3.0, "tokens": 1_000_000, "lr": 1e-2}),
])
def test_training_recovers_known_sparse_directions(synthetic, architecture, settings):
    x, directions = synthetic
    settings = {"lr": 3e-3, **settings}
    sae = train(x, architecture=architecture, d_sae=256, batch_size=1024, seed=0, progress=False, **settings)
    cosines = recovered(sae, directions)
    assert (cosines >= 0.95).float().mean() >= 0.9, cosines.sort().values[:20]
    fresh, _ = sparse_data(4096, seed=1)  # new samples of the same features
    with torch.no_grad():
        acts = sae.encode(fresh)
        explained = 1 - (sae.decode(acts) - fresh).pow(2).sum() / (fresh - fresh.mean(0)).pow(2).sum()
    assert explained > 0.9
    assert (acts > 0).sum(-1).float().mean() < 16  # 3 true features per row (of 256 latents): sparse at inference


def test_batchtopk_at_inference_fires_about_k_latents(synthetic):
    x, _ = synthetic
    sae = train(x, architecture="batchtopk", d_sae=256, k=3, tokens=200_000, batch_size=1024, lr=3e-3, progress=False)
    fresh, _ = sparse_data(4096, seed=2)
    with torch.no_grad():
        l0 = float((sae.encode(fresh) > 0).sum(-1).float().mean())
    assert 2.0 < l0 < 4.5  # the JumpReLU threshold learned in training keeps about k per token
    assert sae.threshold.unique().numel() == 1 and float(sae.threshold[0].detach()) > 0


def test_scaled_inputs_are_folded_back_into_the_weights(synthetic):
    x, _ = synthetic
    big = x[:50_000] * 300.0  # far from a mean norm of √d_in: training rescales, the SAE reads raw activations
    sae = train(big, architecture="topk", d_sae=256, k=3, tokens=100_000, batch_size=1024, lr=3e-3, progress=False)
    scale = sae.cfg.metadata["training"]["input_scale"]
    assert scale == pytest.approx(math.sqrt(64) / float(big[:16384].norm(dim=-1).mean()), rel=0.05)
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    fresh = sparse_data(4096, seed=3)[0] * 300.0
    with torch.no_grad():
        explained = 1 - (sae(fresh) - fresh).pow(2).sum() / (fresh - fresh.mean(0)).pow(2).sum()
    assert explained > 0.8
    log = sae.training_log
    assert log.last["mse"] == pytest.approx(mse(sae, big[:4096]), rel=0.5)  # the log's MSE is in the raw units


# --- reproducibility ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_sae_bit_for_bit(synthetic):
    x, _ = synthetic
    runs = [train(x, architecture="topk", d_sae=128, k=4, tokens=20_000, batch_size=512, seed=seed, progress=False)
            for seed in (7, 7, 8)]
    first, again, other = (sae.state_dict() for sae in runs)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["W_dec"], other["W_dec"])
    assert runs[0].training_log.rows == runs[1].training_log.rows


def test_same_seed_from_a_model_gives_the_same_sae_bit_for_bit(model):
    tokens = token_ids(40)
    runs = [train(model, HOOK, tokens, architecture="standard", d_sae=64, tokens=4096, batch_size=512, seed=3,
                  progress=False) for _ in range(2)]
    first, again = (sae.state_dict() for sae in runs)
    assert all(torch.equal(first[name], again[name]) for name in first)


# --- sources -----------------------------------------------------------------------------------------------------------


def test_training_from_a_zoo_model_hook_reduces_the_error(model):
    held_out = model.run(token_ids(8, seed=99), capture=HOOK)[HOOK].flatten(0, 1)
    sae = train(model, HOOK, token_ids(200), architecture="topk", d_sae=256, k=16, tokens=40_960, batch_size=256,
                lr=3e-3, seed=0, progress=False)
    assert model.list_hooks() == []
    assert sae.cfg.hook_name == HOOK and sae.cfg.model_name == model.name and sae.cfg.d_in == held_out.shape[-1]
    start = untrained_like(sae)
    with torch.no_grad():
        start.b_dec.copy_(held_out.mean(0))  # a fair start: the untrained SAE centred on the data
    variance = float((held_out - held_out.mean(0)).pow(2).mean())  # the error of predicting the mean
    assert mse(sae, held_out) < 0.6 * min(mse(start, held_out), variance)
    record = sae.cfg.metadata["training"]
    assert record["stopped"] == "completed" and record["tokens_trained"] == 40_960 and record["seed"] == 0
    assert record["data"]["source"] == "model" and sae.cfg.metadata["context_size"] == 64
    assert len(sae.training_log) > 2 and sae.training_log.last["tokens"] == 40_960
    assert not sae.training  # returned in eval mode


def test_padding_never_reaches_the_training_batches(model):
    from neuronmap.sae.streams import open_stream

    texts = ["<s> " + " ".join(["the cat"] * n) for n in (2, 20, 4, 9)]  # uneven lengths: every batch is padded
    stream = open_stream(model, HOOK, texts * 8, batch_size=64, tokens=1000, seed=0, device=torch.device("cpu"),
                         dtype=torch.float32, context_length=None, model_batch_size=4, buffer_tokens=256)
    served = torch.cat([next(stream.batches) for _ in range(8)])
    padded = model.run(texts, capture=HOOK)
    mask = padded.attention_mask.bool()
    real = torch.cat([model.run(text, capture=HOOK)[HOOK][0] for text in texts])  # each text alone: no padding
    pads = padded[HOOK][~mask]
    assert len(pads) > 20
    to_real = torch.cdist(served, real).min(-1).values
    to_pads = torch.cdist(served, pads).min(-1).values
    assert to_real.max() < 0.1 < to_pads.min()  # every row served is a real token's activation, none a pad's


def test_training_from_an_activation_store(model, tmp_path):
    store = nm.extract(model, token_ids(60, seed=5), [HOOK, "blocks.1.hook_resid_post"], tmp_path / "acts.h5",
                       dtype=torch.float32, progress=False)
    held_out = store[HOOK][:2048]
    sae = train(store, HOOK, architecture="standard", d_sae=256, tokens=16_384, batch_size=512, lr=2e-3,
                l1_coefficient=0.5, progress=False)
    assert sae.cfg.hook_name == HOOK and sae.cfg.model_name == model.name
    assert sae.cfg.metadata["training"]["data"]["source"] == "store"
    start = untrained_like(sae)
    with torch.no_grad():
        start.b_dec.copy_(held_out.mean(0))
    assert mse(sae, held_out) < 0.5 * mse(start, held_out)
    with pytest.raises(InputError, match="2 hooks"):
        train(store, architecture="topk", d_sae=64, k=4, tokens=512, batch_size=256, progress=False)
    with pytest.raises(HookNameError):
        train(store, "blocks.0.hook_mlp_out", architecture="topk", d_sae=64, k=4, tokens=512, progress=False)


def test_inputs_that_run_out_are_read_again_with_a_warning(model):
    with pytest.warns(UserWarning, match="reading them again"):
        sae = train(model, HOOK, token_ids(4), architecture="topk", d_sae=64, k=4, tokens=2048, batch_size=256,
                    progress=False)
    assert sae.cfg.metadata["training"]["passes_over_data"] >= 2


def test_an_iterator_that_runs_out_is_an_error(model):
    once = iter(["<s> the cat sat on the mat"] * 4)
    with pytest.raises(InputError, match="cannot be read again"):
        train(model, HOOK, once, architecture="topk", d_sae=64, k=4, tokens=4096, batch_size=64, progress=False)
    assert model.list_hooks() == []


# --- checkpoints and divergence -----------------------------------------------------------------------------------------


def test_checkpoints_are_saelens_folders_and_the_final_one_is_the_returned_sae(synthetic, tmp_path):
    x, _ = synthetic
    sae = train(x, architecture="topk", d_sae=128, k=4, tokens=8192, batch_size=1024, checkpoint_dir=tmp_path,
                checkpoint_every=3000, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["final", "tokens_3072", "tokens_6144", "training_log.json"]
    final = SAE.load(tmp_path / "final")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(final.state_dict()[name], tensor), name
    middle = SAE.load(tmp_path / "tokens_3072")
    assert middle.cfg.metadata["training"]["tokens_trained"] == 3072
    assert not torch.equal(middle.W_dec, final.W_dec)
    log = TrainingLog.load(tmp_path / "training_log.json")
    assert log.rows == sae.training_log.rows
    raw = json.loads((tmp_path / "final" / "cfg.json").read_text())
    assert raw["architecture"] == "topk" and raw["k"] == 4


def test_a_non_finite_loss_stops_with_the_last_good_weights_and_checkpoints(tmp_path):
    x = torch.randn(8192, 16, generator=torch.Generator().manual_seed(0))
    x[100] = math.inf  # a bad activation, reached some batches into the run
    settings = dict(tokens=20_000, batch_size=256, normalize_inputs=False, lr_schedule="constant",
                    dead_after_tokens=2048, progress=False)
    sae = SAE("topk", 16, 32, k=4, seed=0)
    with pytest.raises(SAEError, match="loss became nan at step") as caught:
        train(x, sae=sae, checkpoint_dir=tmp_path, checkpoint_every=1024, **settings)
    error = caught.value
    assert error.step > 8 and error.tokens == (error.step - 1) * 256 and error.sae is sae
    assert "last checkpoint" in str(error)
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    # the weights are those of a clean run of the steps before the failure
    reference = SAE("topk", 16, 32, k=4, seed=0)
    train(x, sae=reference, **{**settings, "tokens": error.tokens})
    for name, tensor in reference.state_dict().items():
        assert torch.equal(sae.state_dict()[name], tensor), name
    checkpoints = sorted(int(p.name.split("_")[1]) for p in tmp_path.glob("tokens_*"))
    assert checkpoints and checkpoints[-1] <= error.tokens and not (tmp_path / "final").exists()
    assert SAE.load(tmp_path / f"tokens_{checkpoints[-1]}").cfg.metadata["training"]["tokens_trained"] == checkpoints[-1]
    assert sae.cfg.metadata["training"]["stopped"].startswith("diverged")


# --- bad input ---------------------------------------------------------------------------------------------------------


def test_a_bad_hook_name_raises_and_leaves_no_hook(model):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_pots"):
        train(model, "blocks.0.hook_resid_pots", token_ids(4), d_sae=64, k=4, tokens=1024, progress=False)
    assert model.list_hooks() == []


@pytest.mark.parametrize("settings, message", [
    ({"architecture": "topk", "d_sae": 64, "k": 65}, "k between 1 and d_sae=64"),
    ({"architecture": "topk", "d_sae": 64, "k": 0}, "k between 1"),
    ({"architecture": "standard", "d_sae": 64, "k": 4}, "k only applies"),
    ({"architecture": "topk", "d_sae": 0, "k": 4}, "d_sae must be a positive int"),
    ({"architecture": "gated", "d_sae": 64}, "architecture 'gated'"),
])
def test_bad_widths_and_architectures_are_refused_before_any_forward_pass(model, settings, message):
    calls = []
    with model.hooks({HOOK: lambda a, h: calls.append(1)}):
        with pytest.raises(SAEError, match=message):
            train(model, HOOK, token_ids(4), tokens=1024, progress=False, **settings)
    assert calls == [] and model.list_hooks() == []


@pytest.mark.parametrize("settings, message", [
    ({"tokens": 0}, "tokens must be a positive int"),
    ({"batch_size": 1.5}, "batch_size must be a positive int"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"l1_coefficient": math.nan}, "l1_coefficient must be a non-negative number"),
    ({"lr_schedule": "step"}, "lr_schedule 'step'"),
    ({"b_dec_init": "median"}, "b_dec_init 'median'"),
    ({"checkpoint_every": 1000}, "checkpoint_every needs checkpoint_dir"),
])
def test_bad_settings_are_refused(synthetic, settings, message):
    with pytest.raises(InputError, match=message):
        train(synthetic[0], **{"d_sae": 64, "k": 4, "progress": False, **settings})


def test_an_sae_that_does_not_fit_the_hook_is_refused(model):
    wrong = SAE("topk", 32, 64, k=4)
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(SAEError, match="d_in=32 features but the activations at 'blocks.0.hook_resid_post' have 128"):
        train(model, HOOK, token_ids(4), sae=wrong, tokens=1024, progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in wrong.state_dict().items())
    assert model.list_hooks() == []


# --- the log -----------------------------------------------------------------------------------------------------------


def test_the_training_log_renders_plots_and_escapes(synthetic):
    sae = train(synthetic[0], architecture="topk", d_sae=64, k=4, tokens=30 * 256, batch_size=256, log_every=1,
                progress=False)
    log = sae.training_log
    assert len(log) == 30 and list(log.rows[0]) == list(COLUMNS)
    assert log["tokens"] == [256 * (i + 1) for i in range(30)]
    assert all(0 <= v <= 1 for v in log["dead_fraction"]) and all(v == 4 for v in log["l0"])
    figure = log.figure()
    assert {trace.name for trace in figure.data} >= {"loss", "mse_loss", "l0", "mse", "explained_variance"}
    assert "12 of 30 logged steps shown" in log._repr_html_()
    hostile = TrainingLog(log.rows, {**log.settings, "model_name": "<script>alert(1)</script>"})
    html = hostile._repr_html_()
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "topk SAE 64 → 64, k=4" in repr(log)


def test_the_progress_bar_shows_live_metrics(synthetic, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(synthetic[0], architecture="topk", d_sae=64, k=4, tokens=4096, batch_size=512, progress=True)
    err = capsys.readouterr().err
    assert "training topk SAE" in err and "L0 4.0" in err and "explained var" in err and "dead" in err


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_an_sae_with_decoder_norm_rescaling_trains_and_reads_raw_activations(synthetic, architecture):
    x = synthetic[0][:50_000] * 40.0
    sae = SAE(architecture, 64, 256, k=3, seed=0, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 256)[:, None])  # uneven decoder norms: the rescaling matters
        sae.b_dec.copy_(x.mean(0))
    train(x, sae=sae, tokens=60_000, batch_size=1024, lr=3e-3, unit_norm_decoder=False, progress=False)
    assert sae.cfg.metadata["training"]["input_scale"] != pytest.approx(1.0, rel=0.1)
    sample = x[:8192]
    with torch.no_grad():
        explained = 1 - (sae(sample) - sample).pow(2).sum() / (sample - sample.mean(0)).pow(2).sum()
        l0 = float((sae.encode(sample) > 0).sum(-1).float().mean())
    # on raw activations the returned SAE does what it did on the scaled ones in training
    assert float(explained) == pytest.approx(sae.training_log.last["explained_variance"], abs=0.05)
    assert float(explained) > 0.3 and 1.5 < l0 < 4.5
