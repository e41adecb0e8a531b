"""The attention viewer in a real browser: the static page from a real model's patterns, and hostile tokens."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.attention import AttentionPatterns
from neuronmap.zoo.recipes import induction

pytestmark = pytest.mark.browser

HOSTILE = ['<img src=x onerror="window.__nm_pwned=1">', "<script>window.__nm_pwned=2</script>", "\"&<>'"]


@pytest.fixture(scope="module")
def patterns() -> AttentionPatterns:
    """induction-2l on a repeated segment, with three tokens' labels replaced by hostile strings."""
    words = induction.vocabulary()[10:22]
    real = nm.attention(nm.zoo.load("induction-2l"), " ".join(words + words))
    labels = [list(real.str_tokens[0])]
    labels[0][1:4] = HOSTILE
    return AttentionPatterns(dict(zip(real.layers, (real[layer] for layer in real.layers))), real.tokens, real.attention_mask, labels, "induction-2l")


def open_static(page, patterns, tmp_path):
    path = tmp_path / "view.html"
    patterns.save_html(path)
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-attn[data-ready='0:0']", timeout=10_000)
    return path


def weights_shown(page) -> list[float]:
    return page.eval_on_selector_all(".nm-token", "spans => spans.map(s => s.dataset.weight === undefined ? null : Number(s.dataset.weight))")


def expected(patterns, layer, heads, *, row=None, column=None) -> list[float]:
    block = patterns[layer][0].float()
    picked = block[heads, row, :] if row is not None else block[heads, :, column]
    quantised = ((picked.sqrt() * 255).round() / 255) ** 2  # what the page decodes from its bytes
    return [round(float(v), 3) for v in quantised.max(dim=0).values]


def test_static_view_renders_offline_and_tokens_stay_text(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    assert page.errors == [] and page.external_requests == []
    assert page.evaluate("window.__nm_pwned") is None
    texts = page.eval_on_selector_all(".nm-token", "spans => spans.map(s => s.textContent)")
    assert texts[1:4] == HOSTILE and len(texts) == 25
    assert page.locator(".nm-head").count() == 4
    assert page.locator(".nm-fallback").count() == 0  # replaced by the live rendering
    size = page.evaluate("(() => { const c = document.querySelector('.nm-matrix canvas'); return [c.width, c.height]; })()")
    assert size == [25, 25]


def test_hover_highlights_what_a_token_attends_to_and_from(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    query = 18  # a token of the repeat: layer 0 head 0 looks one back
    page.hover(f".nm-token[data-index='{query}']")
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [0], row=query), abs=1e-3)
    assert page.locator(".nm-token.nm-focus").get_attribute("data-index") == str(query)
    page.click(".nm-mode")
    page.hover(f".nm-token[data-index='{query}']")
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [0], column=query), abs=1e-3)


def test_heads_overlay_and_layers_switch(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    page.click(".nm-head[data-head='1']")
    assert page.locator(".nm-head.nm-selected").count() == 2
    page.select_option(".nm-layer", "1")
    page.wait_for_selector(".nm-attn[data-ready='1:0']")
    query = 20
    page.hover(f".nm-token[data-index='{query}']")
    assert weights_shown(page) == pytest.approx(expected(patterns, 1, [0, 1], row=query), abs=1e-3)
    # the strongest induction head of the card looks at the token after the query's first copy
    head = nm.zoo.card("induction-2l")["metrics"]["induction_heads"][0]["head"]
    page.click(".nm-head[data-head='0']")
    page.click(".nm-head[data-head='1']")
    page.click(f".nm-head[data-head='{head}']")
    page.hover(f".nm-token[data-index='{query}']")
    shown = weights_shown(page)
    assert max(range(len(shown)), key=lambda j: shown[j] or 0) == query - 12 + 1
    assert page.errors == []


def test_several_views_on_one_page_render_independently(page, patterns, tmp_path):
    html = patterns._repr_html_()
    other = patterns.head_scores("previous_token")._repr_html_()
    path = tmp_path / "two.html"
    path.write_text(f"<!doctype html><meta charset='utf-8'><body>{html}{other}{html}</body>")
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('.nm-attn[data-ready]').length === 2", timeout=10_000)
    page.locator(".nm-attn").nth(1).locator(".nm-head[data-head='2']").click()
    assert page.locator(".nm-attn").nth(0).locator(".nm-head.nm-selected").count() == 1
    assert page.locator(".nm-attn").nth(1).locator(".nm-head.nm-selected").count() == 2
    assert page.errors == []


def test_a_truncated_static_view_says_so_in_the_page(page, tmp_path, monkeypatch):
    from neuronmap import attention_view

    monkeypatch.setattr(attention_view, "STATIC_MAX_TOKENS", 16)
    n = 40
    tokens = torch.arange(3, 3 + n)[None]
    pattern = torch.softmax(torch.randn(1, 2, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -1e9), -1)
    patterns = AttentionPatterns({0: pattern}, tokens, torch.ones_like(tokens), [[f"w{i}" for i in range(n)]], "m")
    path = tmp_path / "cut.html"
    patterns.save_html(path)
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-attn[data-ready]")
    assert "showing the first 16 of 40 tokens" in page.inner_text(".nm-note")
    assert page.locator(".nm-token").count() == 16
