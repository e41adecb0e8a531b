"""The attention viewer in a real browser: the static page from a real model's patterns, and hostile tokens;
long prompts wrap, highlighted text stays readable, and the keyboard reaches everything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import neuronmap as nm
import wcag
from neuronmap.attention import AttentionPatterns
from neuronmap.zoo.recipes import induction

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"

HOSTILE = ['<img src=x onerror="window.__nm_pwned=1">', "<script>window.__nm_pwned=2</script>", "\"&<>'"]


@pytest.fixture(scope="module")
def patterns() -> AttentionPatterns:
    """induction-2l on a repeated segment, with three tokens' labels replaced by hostile strings."""
    words = induction.vocabulary()[10:22]
    real = nm.attention(nm.zoo.load("induction-2l"), " ".join(words + words))
    labels = [list(real.str_tokens[0])]
    labels[0][1:4] = HOSTILE
    return AttentionPatterns(dict(zip(real.layers, (real[layer] for layer in real.layers))), real.tokens, real.attention_mask, labels, "induction-2l")


# For each element: its text colour and the background colours of it and every ancestor, innermost first.
COLOURS = """elements => elements.map((element) => {
  const chain = [];
  for (let at = element; at; at = at.parentElement) chain.push(getComputedStyle(at).backgroundColor);
  return { text: getComputedStyle(element).color, chain, weight: element.dataset.weight ?? null };
})"""


def open_static(page, patterns, tmp_path, **options):
    path = tmp_path / "view.html"
    patterns.save_html(path, **options)
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-attn[data-ready]", timeout=10_000)
    return path


def weights_shown(page) -> list[float]:
    return page.eval_on_selector_all(".nm-token", "spans => spans.map(s => s.dataset.weight === undefined ? null : Number(s.dataset.weight))")


def expected(patterns, layer, heads, *, row=None, column=None, prompt=0) -> list[float]:
    block = torch.stack([patterns.pattern(layer, head, prompt) for head in range(patterns.n_heads)])
    picked = block[heads, row, :] if row is not None else block[heads, :, column]
    quantised = ((picked.float().sqrt() * 255).round() / 255) ** 2  # what the page decodes from its bytes
    return [round(float(v), 3) for v in quantised.max(dim=0).values]


def text_contrasts(locator) -> list[tuple[float, dict]]:
    """WCAG contrast of each element's text with what is really behind it (its own and its ancestors' backgrounds
    painted over the page's white canvas), with what was measured."""
    measured = []
    for item in locator.evaluate_all(COLOURS):
        background = (255, 255, 255)
        for layer in reversed(item["chain"]):
            background = wcag.over(layer, background)
        measured.append((wcag.contrast(wcag.over(item["text"], background), background), item))
    return measured


def highlighted_contrasts(view) -> list[tuple[float, dict]]:
    """`text_contrasts` of every highlighted token in `view` (a locator of the viewer's root)."""
    return text_contrasts(view.locator(".nm-token[data-weight]"))


def assert_fits(view, container: str) -> dict:
    """The token strip wraps inside the viewer's closest ancestor that matches the CSS selector `container`: nothing
    scrolls sideways, and no token reaches past the container's right edge."""
    sizes = view.evaluate(
        """(root, selector) => {
          const box = root.querySelector('.nm-tokens');
          const container = root.closest(selector);
          const rights = [...box.children].map((s) => s.getBoundingClientRect().right);
          return { scroll: box.scrollWidth, client: box.clientWidth, rootScroll: root.scrollWidth, rootClient: root.clientWidth,
                   right: Math.max(...rights), edge: container.getBoundingClientRect().right, scrollLeft: box.scrollLeft,
                   lines: new Set([...box.children].map((s) => Math.round(s.getBoundingClientRect().top))).size };
        }""",
        container,
    )
    assert sizes["scroll"] <= sizes["client"], sizes
    assert sizes["rootScroll"] <= sizes["rootClient"], sizes
    assert sizes["right"] <= sizes["edge"] + 0.5, sizes
    assert sizes["scrollLeft"] == 0, sizes
    return sizes


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


def random_patterns(n: int, heads: int = 2, layers: int = 1, labels=None, seed: int = 0) -> AttentionPatterns:
    """Causal softmax patterns of random scores over `n` tokens labelled `labels` (default " w0", " w1", …)."""
    generator = torch.Generator().manual_seed(seed)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    by_layer = {layer: torch.softmax((torch.randn(1, heads, n, n, generator=generator) * 3).masked_fill(~causal, -1e9), -1) for layer in range(layers)}
    tokens = torch.arange(3, 3 + n)[None]
    return AttentionPatterns(by_layer, tokens, torch.ones_like(tokens), [labels or [f" w{i}" for i in range(n)]], "random")


def test_a_truncated_static_view_says_so_and_how_to_see_more(page, tmp_path):
    patterns = random_patterns(400, heads=4)
    open_static(page, patterns, tmp_path, budget=20_000)
    note = page.inner_text(".nm-note")
    shown = page.locator(".nm-token").count()
    assert 16 <= shown < 400 and f"showing the first {shown} of 400 tokens" in note
    assert "budget=" in note and "embeds all of them" in note
    assert page.evaluate("document.querySelector('.nm-matrix canvas').width") == shown


def test_a_long_prompt_wraps_inside_the_output(page, tmp_path):
    """500 tokens in an 800 px output: the strip wraps onto lines, and hovering never scrolls the prompt sideways."""
    patterns = random_patterns(500, labels=[" x", "x", "xx"] + [f" w{i}" for i in range(3, 500)])
    html = patterns._repr_html_()
    path = tmp_path / "long.html"
    path.write_text(f"<!doctype html><meta charset='utf-8'><body><div id='output' style='width:800px'>{html}</div></body>")
    page.set_viewport_size({"width": 1000, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-attn[data-ready='0:0']")
    view = page.locator(".nm-attn")
    assert page.locator(".nm-token").count() == 500
    sizes = assert_fits(view, "#output")
    assert sizes["lines"] > 10
    page.hover(".nm-token[data-index='499']")
    assert_fits(view, "#output")
    assert page.locator(".nm-token[data-index='0']").bounding_box()["x"] >= page.locator("#output").bounding_box()["x"]
    # each token keeps its spacing: " x" is one monospace character wider than "x", as "xx" is
    width = {i: page.locator(f".nm-token[data-index='{i}']").bounding_box()["width"] for i in range(3)}
    assert width[0] - width[1] == pytest.approx(width[2] - width[1], abs=0.5) and width[2] > width[1]
    page.screenshot(path=str(ARTIFACTS / "static-attention-long-prompt.png"), full_page=True)
    assert page.errors == []


def test_highlighted_tokens_keep_readable_text(page, patterns, tmp_path):
    """Every highlighted token contrasts at least 4.5:1 with its text, the most-attended ones included."""
    open_static(page, patterns, tmp_path)
    view = page.locator(".nm-attn")
    seen = []
    for heads in ([0], [1], [0, 1, 2, 3]):
        for head in range(4):
            if (head in heads) != (page.locator(f".nm-head[data-head='{head}']").get_attribute("aria-pressed") == "true"):
                page.click(f".nm-head[data-head='{head}']")
        for mode in ("from", "to"):
            for query in range(0, 25, 3):
                page.hover(f".nm-token[data-index='{query}']")
                seen += highlighted_contrasts(view)
            page.click(".nm-mode")
    low = [(ratio, item) for ratio, item in seen if ratio < wcag.AA]
    assert not low, low[:3]
    assert len(seen) > 1000
    assert max(float(item["weight"]) for _, item in seen) > 0.95  # the darkest highlights were among them
    assert {item["text"] for _, item in seen} == {"rgb(0, 0, 0)", "rgb(255, 255, 255)"}  # both text colours used
    assert page.errors == []


def test_view_text_is_readable_on_the_static_page(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    page.hover(".nm-token[data-index='5']")
    for selector in (".nm-bar label", ".nm-info", ".nm-note", ".nm-axis", ".nm-head span", ".nm-token"):
        for ratio, item in text_contrasts(page.locator(selector)):
            assert ratio >= wcag.AA, (selector, ratio, item)


def test_the_keyboard_toggles_heads_and_pins_tokens(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    active = lambda: page.evaluate("(() => { const a = document.activeElement; return [a.className, a.dataset.head ?? a.dataset.index ?? null]; })()")
    page.focus(".nm-mode")
    page.keyboard.press("Tab")
    assert active() == ["nm-head nm-selected", "0"]
    page.keyboard.press("Space")  # head 0 off
    assert page.locator(".nm-head[data-head='0']").get_attribute("aria-pressed") == "false"
    assert active()[1] == "0"  # the focus stays on the head toggled
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # head 1 on
    assert page.locator(".nm-head[aria-pressed='true']").evaluate_all("cells => cells.map(c => c.dataset.head)") == ["1"]
    for _ in range(3):  # heads 2 and 3, then the token strip
        page.keyboard.press("Tab")
    assert active() == ["nm-token nm-focus", "0"]
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [1], row=0), abs=1e-3)  # focus shows like hover
    for _ in range(18):
        page.keyboard.press("ArrowRight")
    assert active()[1] == "18"
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [1], row=18), abs=1e-3)
    page.keyboard.press("Enter")  # pin token 18
    assert page.locator(".nm-token[data-index='18']").get_attribute("aria-selected") == "true"
    page.hover(".nm-token[data-index='3']")
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [1], row=18), abs=1e-3)  # pinned
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Space")  # the pin moves to token 17
    assert page.locator(".nm-token[aria-selected='true']").get_attribute("data-index") == "17"
    page.keyboard.press("Space")  # and is released: the focused token shows until the pointer moves
    assert page.locator(".nm-token[aria-selected='true']").count() == 0
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [1], row=17), abs=1e-3)
    page.hover(".nm-token[data-index='4']")
    assert weights_shown(page) == pytest.approx(expected(patterns, 0, [1], row=4), abs=1e-3)
    assert page.locator(".nm-token[tabindex='0']").count() == 1  # one token in the Tab order
    assert page.errors == []


def test_the_matrix_axes_and_controls_are_labelled(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    assert page.inner_text(".nm-axis-query") == "query \u2193" and page.inner_text(".nm-axis-key") == "key \u2192"
    query, key, matrix = (page.locator(s).bounding_box() for s in (".nm-axis-query", ".nm-axis-key", ".nm-matrix"))
    assert query["x"] + query["width"] <= matrix["x"] and key["y"] + key["height"] <= matrix["y"]
    assert page.get_by_role("img", name="attention matrix of layer 0, heads 0, 25 tokens", exact=False).count() == 1
    assert "row i is query token i" in page.get_attribute(".nm-matrix canvas", "aria-label")
    assert page.get_by_role("combobox", name="layer").count() == 1
    assert page.get_by_role("button", name="head 2").get_attribute("aria-pressed") == "false"
    assert page.get_by_role("group", name="heads of layer 0", exact=False).count() == 1
    tokens = page.get_by_role("listbox", name="tokens", exact=False)
    assert tokens.count() == 1 and tokens.get_by_role("option").count() == 25


def test_a_static_view_of_several_prompts_switches_between_them(page, tmp_path):
    words = induction.vocabulary()[10:22]
    real = nm.attention(nm.zoo.load("induction-2l"), [" ".join(words + words), " ".join(words[:5])])
    open_static(page, real, tmp_path, prompts=[0, 1], layers=[0, 1])
    assert page.locator(".nm-token").count() == 25 and page.is_visible(".nm-prompt")
    page.select_option(".nm-prompt", "1")
    page.wait_for_selector(".nm-attn[data-ready='0:1']")
    assert page.locator(".nm-token").count() == 6
    page.hover(".nm-token[data-index='4']")
    assert weights_shown(page) == pytest.approx(expected(real, 0, [0], row=4, prompt=1), abs=1e-3)
    page.select_option(".nm-layer", "1")
    page.wait_for_selector(".nm-attn[data-ready='1:1']")
    page.hover(".nm-token[data-index='5']")
    assert weights_shown(page) == pytest.approx(expected(real, 1, [0], row=5, prompt=1), abs=1e-3)
    page.select_option(".nm-prompt", "0")
    page.wait_for_selector(".nm-attn[data-ready='1:0']")
    assert page.locator(".nm-token").count() == 25 and page.errors == []


def test_a_single_prompt_static_view_has_no_prompt_switch(page, patterns, tmp_path):
    open_static(page, patterns, tmp_path)
    assert not page.is_visible(".nm-prompt")
