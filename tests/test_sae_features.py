"""SAE feature statistics and dashboards: every number the one streaming pass keeps equals a brute-force computation in
the test over the same tokens (the whole set encoded at once, then sorted, counted and histogrammed by hand), from a
model and from an activation store; the dashboards' data, bounds and escaping; bad input; and the shared token-text
view."""

from __future__ import annotations

import base64
import json
import math
import re
import zlib

import numpy as np
import pytest
import torch
import transformers

import neuronmap as nm
from neuronmap.sae import SAE
from neuronmap.sae.dashboard import FeatureBrowser, read_blob
from neuronmap.sae.features import _Accumulator, _Batch, _Settings, feature_statistics
from neuronmap.tokentext import TokenText, token_text_html
from neuronmap.zoo.recipes import induction

HOOK = "blocks.1.hook_resid_post"
LENGTH = 24
SETTINGS = dict(top_k=5, context=(3, 2), bins=16, bands=4, band_samples=3, token_features=4, logit_tokens=6,
                batch_size=7, progress=False)
HOSTILE = ['<img src=x onerror="window.__nm_pwned=1">', "<script>window.__nm_pwned=2</script>", "\"&<>'"]


@pytest.fixture(scope="module")
def model() -> nm.Model:
    return nm.load("induction-2l")


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 512, (60, LENGTH), generator=torch.Generator().manual_seed(0))


def make_sae(architecture: str = "topk", d_sae: int = 96, seed: int = 0) -> SAE:
    extra = {"k": 6} if architecture == "topk" else {}
    sae = SAE(architecture, d_in=128, d_sae=d_sae, hook_name=HOOK, seed=seed, **extra)
    with torch.no_grad():  # a spread of biases, so some latents fire often, some rarely and some never
        sae.b_enc.copy_(torch.linspace(-3.0, 0.5, d_sae)[torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))])
    return sae


@pytest.fixture(scope="module", params=["topk", "standard"])
def case(request, model, tokens):
    """An SAE, its statistics over `tokens`, and the brute force: every latent on every token, encoded at once."""
    sae = make_sae(request.param)
    stats = feature_statistics(sae, model, tokens, **SETTINGS)
    with torch.no_grad():
        acts = sae.encode(model.run(tokens, capture=HOOK)[HOOK].reshape(-1, 128))
    return sae, stats, acts


def test_counts_densities_max_and_means_equal_the_brute_force(case, tokens):
    _, stats, acts = case
    assert stats.n_tokens == tokens.numel() == len(stats.tokens)
    assert stats.tokens.tolist() == tokens.flatten().tolist()
    assert stats.starts.tolist() == list(range(0, tokens.numel() + 1, LENGTH))
    fires = acts > 0
    assert stats.count.tolist() == fires.sum(0).tolist()
    assert torch.equal(stats.density, fires.sum(0).double() / tokens.numel())
    assert torch.equal(stats.max, acts.amax(0))
    mean = acts.double().sum(0) / fires.sum(0)
    alive = fires.any(0)
    assert torch.allclose(stats.mean_active[alive], mean[alive], rtol=1e-5)
    assert stats.mean_active[~alive].isnan().all() and stats.dead.tolist() == (~alive).nonzero().flatten().tolist()
    assert len(stats.dead) < 96 and (stats.density[alive] < 0.05).any() and (stats.density > 0.3).any()


def test_histograms_equal_a_histogram_by_hand_over_0_to_the_power_of_two_above_the_max(case):
    _, stats, acts = case
    for latent in range(acts.shape[1]):
        values = acts[:, latent][acts[:, latent] > 0].double()
        if values.numel() == 0:
            assert stats.histogram[latent].sum() == 0
            continue
        top = 2.0 ** math.floor(math.log2(values.max()) + 1)  # the smallest power of two above the max
        assert values.max() < top <= 2 * values.max()
        edges = stats.histogram_edges(latent)
        assert edges[-1] == top and edges.tolist() == [top * i / 16 for i in range(17)]
        by_hand = torch.bincount((values / top * 16).floor().long(), minlength=16)
        assert stats.histogram[latent].tolist() == by_hand.tolist()


def test_top_activations_are_each_latents_largest_with_their_rows(case):
    _, stats, acts = case
    for latent in range(acts.shape[1]):
        column = acts[:, latent]
        expected = column[column > 0].sort(descending=True).values[:5]
        rows = stats.top_rows[latent]
        kept = rows >= 0
        assert kept.sum() == len(expected) and (rows[: len(expected)] >= 0).all()
        assert torch.equal(stats.top_values[latent][kept], expected)
        assert torch.equal(column[rows[kept]], expected)  # each row really holds its value
        assert len(set(rows[kept].tolist())) == len(expected)


def test_contexts_show_the_tokens_around_each_top_activation_within_its_sequence(case, model, tokens):
    _, stats, acts = case
    flat = tokens.flatten()
    seen = 0
    for latent in range(acts.shape[1]):
        for context in stats.top_contexts(latent):
            sequence, position = divmod(context.row, LENGTH)
            assert (context.sequence, context.position) == (sequence, position)
            first = max(0, position - 3)
            last = min(LENGTH - 1, position + 2)
            rows = list(range(sequence * LENGTH + first, sequence * LENGTH + last + 1))
            assert context.ids == flat[rows].tolist()
            assert context.tokens == model.to_str_tokens(flat[rows])
            assert context.activations == acts[rows, latent].tolist()
            assert context.marked == position - first and context.activations[context.marked] == context.value
            seen += 1
    assert seen > 100


def test_interval_samples_come_from_their_interval_and_say_its_share(case):
    _, stats, acts = case
    checked = 0
    for latent in range(acts.shape[1]):
        column = acts[:, latent]
        values = column[column > 0].double()
        intervals = stats.intervals(latent)
        if values.numel() == 0:
            assert intervals == []
            continue
        top = float(stats.histogram_edges(latent)[-1])
        bands = [(top * b / 4, top * (b + 1) / 4) for b in reversed(range(4))]
        expected = [(low, high) for low, high in bands if ((values >= low) & (values < high)).any()]
        assert [(i.low, i.high) for i in intervals] == expected
        for interval in intervals:
            inside = ((values >= interval.low) & (values < interval.high)).sum().item()
            assert interval.share == pytest.approx(inside / values.numel())
            assert len(interval.contexts) == min(3, inside)
            samples = [context.value for context in interval.contexts]
            assert samples == sorted(samples, reverse=True)
            assert len({context.row for context in interval.contexts}) == len(samples)
            for context in interval.contexts:
                assert interval.low <= context.value < interval.high
                assert column[context.row] == context.value
                checked += 1
    assert checked > 200


def test_each_tokens_most_active_latents_are_its_largest(case):
    _, stats, acts = case
    for row in range(0, acts.shape[0], 5):
        values = acts[row][acts[row] > 0].sort(descending=True).values[:4].tolist()
        found = stats.features_on(row)
        assert [value for _, value in found] == values
        assert all(acts[row, latent] == value for latent, value in found)


def test_logit_effects_are_the_decoder_through_the_final_norm_and_unembedding(case, model):
    sae, stats, _ = case
    ln_f = model.module.transformer.ln_f
    directions = sae.W_dec.detach()
    logits = ((directions - directions.mean(-1, keepdim=True)) * ln_f.weight.detach()) @ model.module.lm_head.weight.detach().T
    top, bottom = logits.topk(6, dim=1), logits.topk(6, dim=1, largest=False)
    assert stats.logits["top_ids"].tolist() == top.indices.tolist()
    assert stats.logits["bottom_ids"].tolist() == bottom.indices.tolist()
    assert torch.allclose(stats.logits["top_values"], top.values, atol=1e-5)
    assert torch.allclose(stats.logits["bottom_values"], bottom.values, atol=1e-5)
    effects = stats.logit_effects(7)
    assert [text for text, _ in effects["top"]] == model.to_str_tokens(top.indices[7])
    assert [value for _, value in effects["bottom"]] == pytest.approx(bottom.values[7].tolist(), abs=1e-5)


@pytest.mark.parametrize("hook, d_in", [("blocks.0.attn.hook_z", 128), ("blocks.0.mlp.hook_post", 512)])
def test_logit_effects_of_a_latent_off_the_residual_stream_go_through_its_output_weights(model, tokens, hook, d_in):
    extra = {"reshape_activations": "hook_z"} if hook.endswith("hook_z") else {}
    sae = SAE("topk", d_in=d_in, d_sae=16, k=3, hook_name=hook, seed=0, **extra)
    stats = feature_statistics(sae, model, tokens[:8], **SETTINGS)
    block = model.module.transformer.h[0]
    out = block.attn.c_proj.weight if hook.endswith("hook_z") else block.mlp.c_proj.weight  # Conv1D: [in, out]
    residual = sae.W_dec.detach() @ out.detach()
    ln_f = model.module.transformer.ln_f
    logits = ((residual - residual.mean(-1, keepdim=True)) * ln_f.weight.detach()) @ model.module.lm_head.weight.detach().T
    assert stats.logits["top_ids"].tolist() == logits.topk(6, dim=1).indices.tolist()
    with torch.no_grad():
        acts = sae.encode(model.run(tokens[:8], capture=hook)[hook].flatten(0, 1))  # [token, head, d_head] for hook_z
    assert stats.n_tokens == 8 * LENGTH and stats.count.tolist() == (acts > 0).sum(0).tolist()


def test_interval_samples_are_uniform_even_when_intervals_merge():
    """One latent, its activations arriving over 5 batches and its range doubling twice (so intervals merge): over
    600 seeds every activation of the final top interval is kept equally often, s/n."""
    settings = _Settings.checked(1, 0, 4, 2, 2, 0, 0, 1)
    values = [torch.linspace(0.51, 0.99, 8), torch.linspace(1.02, 1.98, 8), torch.linspace(2.1, 3.9, 8),
              torch.linspace(2.05, 3.95, 8), torch.linspace(0.1, 0.4, 8)]
    final_top = torch.cat(values)[torch.cat(values) >= 2.0]  # the interval [2, 4) of the final range [0, 4)
    kept = torch.zeros(len(final_top))
    for seed in range(600):
        accumulator = _Accumulator(1, settings, torch.device("cpu"), seed)
        row = 0
        for batch in values:
            n = len(batch)
            accumulator.add(batch[:, None], _Batch(None, slice(0, n), torch.zeros(n, dtype=torch.long), torch.arange(n), row))
            row += n
        samples = accumulator.samples.payloads["value"].view(2, 2)[1]
        for value in samples[accumulator.samples.scores.view(2, 2)[1] >= 0]:
            kept[(final_top == value).nonzero()[0, 0]] += 1
    share = kept / 600
    assert share.sum() == pytest.approx(2.0)  # two samples each time, from 16 activations
    assert (share - 2 / 16).abs().max() < 0.06  # 4.5 standard deviations of a frequency over 600 draws


def test_the_same_statistics_come_from_an_activation_store(case, model, tokens, tmp_path):
    sae, from_model, acts = case
    store = nm.extract(model, tokens, HOOK, tmp_path / "acts.h5", dtype=torch.float32, batch_size=8, progress=False)
    with store:
        stats = feature_statistics(sae, store, **SETTINGS)
    for name in ("count", "max", "histogram", "exponent", "top_values", "top_rows", "tokens", "starts"):
        assert torch.equal(getattr(stats, name), getattr(from_model, name)), name
    assert stats.top_contexts(3) == from_model.top_contexts(3)
    assert stats.logits is None and stats.logit_effects(3) is None  # a store alone has no unembedding
    for latent in range(0, 96, 7):
        for interval in stats.intervals(latent):
            assert all(interval.low <= c.value < interval.high and acts[c.row, latent] == c.value for c in interval.contexts)
    by_path = feature_statistics(sae, tmp_path / "acts.h5", model=model, **SETTINGS)
    assert torch.equal(by_path.logits["top_ids"], from_model.logits["top_ids"])
    assert by_path.top_contexts(3)[0].tokens == from_model.top_contexts(3)[0].tokens


def test_a_store_of_some_positions_shows_each_token_alone(model, tokens, tmp_path):
    sae = make_sae()
    store = nm.extract(model, tokens, HOOK, tmp_path / "last.h5", positions="last", dtype=torch.float32, progress=False)
    stats = feature_statistics(sae, store, **SETTINGS)
    store.close()
    with torch.no_grad():
        acts = sae.encode(model.run(tokens, capture=HOOK)[HOOK][:, -1])
    assert stats.n_tokens == len(tokens) and stats.count.tolist() == (acts > 0).sum(0).tolist()
    context = stats.top_contexts(int(stats.count.argmax()))[0]
    assert len(context.ids) == 1 and context.marked == 0 and context.position == -1
    assert context.ids == [int(tokens[context.row, -1])]


def test_padding_never_counts(model):
    words = induction.vocabulary()[10:40]
    texts = [" ".join(words[: 3 + i % 11]) for i in range(20)]
    sae = make_sae()
    stats = feature_statistics(sae, model, texts, **SETTINGS)
    lengths = [len(model.to_str_tokens(text)) for text in texts]
    assert stats.n_tokens == sum(lengths) and stats.starts.diff().tolist() == lengths
    with torch.no_grad():
        acts = torch.cat([sae.encode(model.run(text, capture=HOOK)[HOOK][0]) for text in texts])
    assert stats.tokens.tolist() == [t for text in texts for t in model.to_tokens(text)[0].tolist()]
    assert torch.allclose(stats.max, acts.amax(0), atol=1e-4)
    assert (stats.count - (acts > 0).sum(0)).abs().max() <= 1  # the same up to a value at the edge of 0


def test_bad_input_names_the_problem_and_leaves_no_hook(model, tokens, tmp_path):
    wide = SAE("topk", d_in=64, d_sae=32, k=4, hook_name=HOOK, seed=0)
    with pytest.raises(nm.SAEError, match="d_in=64"):
        feature_statistics(wide, model, tokens, progress=False)
    with pytest.raises(nm.HookNameError, match="blocks.1.hook_resid_pots"):
        feature_statistics(make_sae(), model, tokens, hook_name="blocks.1.hook_resid_pots", progress=False)
    with pytest.raises(nm.SAEError, match="latent 96 is out of range: this SAE has d_sae=96"):
        feature_statistics(make_sae(), model, tokens, features=[3, 96], progress=False)
    with pytest.raises(nm.InputError, match="bins must be a power of two"):
        feature_statistics(make_sae(), model, tokens, bins=10, progress=False)
    with pytest.raises(nm.InputError, match="needs inputs"):
        feature_statistics(make_sae(), model, progress=False)
    with pytest.raises(nm.SAEError, match="names no hook"):
        feature_statistics(SAE("topk", d_in=128, d_sae=8, k=2), model, tokens, progress=False)
    assert model.list_hooks() == []
    store = nm.extract(model, tokens[:4], HOOK, tmp_path / "s.h5", dtype=torch.float32, progress=False)
    with pytest.raises(nm.SAEError, match="d_in=64"):
        feature_statistics(wide, store, progress=False)
    with pytest.raises(nm.HookNameError):
        feature_statistics(make_sae(), store, hook_name="blocks.0.hook_resid_post", progress=False)
    stats = feature_statistics(make_sae(), store, **SETTINGS)
    with pytest.raises(nm.SAEError, match="latent 96 is out of range: these statistics cover latents 0 to 95"):
        stats.dashboard(96)
    with pytest.raises(nm.SAEError, match="latent -1 is out of range"):
        stats.top_contexts(-1)
    store.close()
    assert model.list_hooks() == []


def test_some_latents_only(model, tokens, case):
    sae, full, _ = case
    stats = feature_statistics(sae, model, tokens, features=[40, 3, 77], **SETTINGS)
    assert stats.latents.tolist() == [40, 3, 77]
    assert stats.count.tolist() == full.count[[40, 3, 77]].tolist()
    assert stats.top_contexts(77) == full.top_contexts(77)
    assert all(latent in (40, 3, 77) for row in range(50) for latent, _ in stats.features_on(row))
    with pytest.raises(nm.SAEError, match="latent 4 is not among the 3 latents"):
        stats.intervals(4)


# --- the views ---


def _embedded(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json">(.*?)</script>', html, re.S).group(1))


def _blob(text: str) -> tuple[dict, dict]:
    return read_blob(zlib.decompress(base64.b64decode(text)))


def test_a_dashboards_data_is_the_statistics(case):
    _, stats, acts = case
    latent = int(stats.count.argmax())
    data = _embedded(stats.dashboard(latent)._repr_html_())
    assert data["mode"] == "dashboard" and data["open"] == latent and data["list"] is None
    head, arrays = _blob(data["features"][str(latent)])
    assert head["count"] == int(stats.count[latent]) and head["max"] == float(stats.max[latent])
    assert arrays["hist"].tolist() == stats.histogram[latent].tolist()
    contexts = stats.top_contexts(latent) + [c for i in stats.intervals(latent) for c in i.contexts]
    assert [c["value"] for c in head["contexts"]] == [c.value for c in contexts]
    assert arrays["ctx_ids"].tolist() == [t for c in contexts for t in c.ids]
    acts_sent = arrays["ctx_acts"].astype(np.float32)
    assert np.allclose(acts_sent, [a for c in contexts for a in c.activations], rtol=1e-3)
    assert [head["texts"][str(t)] for t in arrays["ctx_ids"].tolist()] == [t for c in contexts for t in c.tokens]
    first = contexts[0]
    on_token = arrays["tok_ids"].reshape(-1, head["m"])[first.marked].tolist()
    assert [f for f in on_token if f != head["none"]] == [f for f, _ in stats.features_on(first.row)]
    assert arrays["top_ids"].tolist() == stats.logits["top_ids"][latent].tolist()


def test_the_browser_embeds_the_first_latents_within_its_budget_and_says_so(case):
    _, stats, _ = case
    page = stats._repr_html_()
    data = _embedded(page)
    alive = [int(i) for i in torch.argsort(-stats.max.double(), stable=True) if stats.count[i] > 0]
    assert list(map(int, data["features"])) == alive[:32]
    assert "dashboards of 32 of 96 latents embedded (the first 32 by max" in data["note"]
    head, arrays = _blob(data["list"])
    assert arrays["latents"].tolist() == sorted(range(96), key=lambda i: (-float(stats.max[i]), i))
    order = arrays["latents"].tolist()
    assert np.array_equal(arrays["density"], stats.density[order].float().numpy())
    assert np.array_equal(arrays["max"], stats.max[order].numpy())
    small = FeatureBrowser(stats, order="density", budget=20_000)._repr_html_()
    data = _embedded(small)
    assert 1 <= len(data["features"]) < 32
    assert sum(map(len, data["features"].values())) <= 20_000 or len(data["features"]) == 1
    assert re.search(r"dashboards of (\d+) of 96 latents embedded \(the first 32 by density were asked for, \1 fit the "
                     r"size limit: budget=[\d_]+ embeds all 32;", data["note"])
    chosen = _embedded(stats.browser([5, 2], n=3)._repr_html_())
    assert list(chosen["features"]) == ["5", "2"] and "(the 2 chosen;" in chosen["note"]
    with pytest.raises(nm.InputError, match="order must be one of"):
        stats.browser(order="loudest")


def test_the_static_page_stays_bounded_however_many_latents(model, tokens):
    sae = SAE("standard", d_in=128, d_sae=1500, hook_name=HOOK, seed=0)  # every latent fires
    stats = feature_statistics(sae, model, tokens, **{**SETTINGS, "top_k": 20, "band_samples": 5})
    page = stats.browser(n=1500)._repr_html_()
    assert len(page.encode()) < 2_000_000
    data = _embedded(page)
    assert 1 <= len(data["features"]) < 1500 and "the first 1500 by max were asked for" in data["note"]
    assert sum(map(len, data["features"].values())) <= 1_500_000


def hostile_model(model: nm.Model) -> nm.Model:
    """induction-2l with a tokenizer whose every third token is hostile markup (as text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"{HOSTILE[i // 3 % 3]}{i}" if i % 3 == 0 and i > 2 else f"w{i}" for i in range(512)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w1", pad_token="w0")
    return nm.load(model.module, tokenizer=tokenizer, name=HOSTILE[0])


def test_hostile_tokens_are_escaped_in_the_static_html(model, tokens):
    stats = feature_statistics(make_sae(), hostile_model(model), tokens, **SETTINGS)
    page = stats._repr_html_()
    assert page.count("<script") == 2 and "<img" not in page and "onerror=\"" not in page
    fallback = re.search(r'<div class="nm-fallback">(.*?)<script', page, re.S).group(1)
    assert "&lt;script&gt;window.__nm_pwned=2&lt;/script&gt;" in fallback or "&lt;img src=x" in fallback
    head, _ = _blob(_embedded(page)["list"])
    assert any(text.startswith(HOSTILE[1]) for text in head["texts"].values())  # kept as text, for textContent


def test_the_live_widget_sends_binary_and_opens_latents_on_demand(case, monkeypatch):
    _, stats, _ = case
    widget = stats.browser().widget()
    assert isinstance(widget.list_data, bytes) and isinstance(widget.payload, bytes)
    first = stats.browser().features[0]
    assert widget.feature == first and widget.payload_key == first
    widget.feature = 11
    head, arrays = read_blob(zlib.decompress(widget.payload))
    assert widget.payload_key == 11 and head["latent"] == 11 and arrays["hist"].tolist() == stats.histogram[11].tolist()
    widget.feature = 500
    assert "latent 500 is out of range" in widget.error and widget.payload_key == 11
    _, listed = read_blob(zlib.decompress(widget.list_data))
    assert len(listed["latents"]) == 96  # the live widget lists every latent
    monkeypatch.setenv("NEURONMAP_WIDGETS", "1")
    bundle = stats._repr_mimebundle_()
    assert "model_id" in bundle["application/vnd.jupyter.widget-view+json"] and bundle["text/html"] == stats._repr_html_()


def test_reprs_and_figures(case):
    _, stats, _ = case
    assert re.fullmatch(r"FeatureStatistics\(96 latents of SAE\(.*\) over 1,440 tokens in 60 sequences, \d+ dead\)",
                        repr(stats))
    assert repr(stats.dashboard(3)).startswith("FeatureDashboard(latent 3 of SAE(")
    figure = stats.figure()
    assert sum(len(trace.x) for trace in figure.data) == int((stats.count > 0).sum())
    bars = stats.dashboard(int(stats.count.argmax())).figure()
    assert list(bars.data[0].y) == stats.histogram[int(stats.count.argmax())].tolist()


def test_the_front_end_ships_and_never_builds_markup_from_data():
    from neuronmap.widget import front_end

    script, css = front_end("sae")
    assert script.rstrip().endswith("export default { render };") and ".nm-sae" in css
    assert "innerHTML" not in script and "fetch(" not in script and "import " not in script
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script + css)


# --- the shared token-text view ---


def test_token_text_shades_escapes_and_marks():
    html = token_text_html(["a", HOSTILE[0], " b\n"], [0.0, 2.0, 4.0], marked=2)
    assert "<img" not in html and "&lt;img src=x onerror=&quot;window.__nm_pwned=1&quot;&gt;" in html
    spans = re.findall(r'<span style="background:#([0-9a-f]{6});color:(#000|#fff)[^"]*"', html)
    half = "".join(f"{round(255 - 0.5 * (255 - c)):02x}" for c in (230, 85, 13))
    assert [colour for colour, _ in spans] == ["ffffff", half, "e6550d"]  # white, half way, the full shade
    assert "outline:2px solid" in html.split("<span")[-1] and " b\u21b5" in html
    assert 'title="&#x27;a&#x27;: 0"' in html
    view = TokenText(["x", "y"], [1.0, -1.0], title=HOSTILE[1])
    assert "<script>" not in view._repr_html_() and repr(view) == f"TokenText({HOSTILE[1]!r}, 2 tokens)"
    with pytest.raises(ValueError, match="2 values for 3 tokens"):
        token_text_html(["a", "b", "c"], [1.0, 2.0])
