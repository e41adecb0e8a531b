"""The SAE feature browser and dashboard in a real browser: the static page renders offline from the statistics of a
model whose tokens are hostile markup (no script of theirs runs, nothing is requested), clicking a latent opens its
dashboard, clicking a token lists the latents most active on it, the table sorts and searches, the live widget's front
end renders from binary buffers, and without JavaScript the plain summary shows."""

from __future__ import annotations

import base64
import collections

import pytest
import torch

import neuronmap as nm
import wcag
from neuronmap.sae.dashboard import SEARCH_TOKENS
from neuronmap.sae.features import feature_statistics
from test_browser_attention import ARTIFACTS, text_contrasts
from test_sae_features import HOSTILE, SETTINGS, hostile_model, make_sae

pytestmark = pytest.mark.browser


def stats_model():
    return hostile_model(nm.load("induction-2l"))


@pytest.fixture(scope="module")
def stats():
    model = stats_model()
    tokens = torch.randint(3, 512, (60, 24), generator=torch.Generator().manual_seed(0))
    return feature_statistics(make_sae(), model, tokens, **SETTINGS)


def open_view(page, tmp_path, view, name: str = "sae.html", browser: bool = True):
    path = tmp_path / name
    view.save_html(path)
    page.set_viewport_size({"width": 1200, "height": 900})
    page.goto(path.as_uri())
    page.wait_for_selector(".nm-sae[data-ready]", timeout=10_000)
    if browser:
        page.wait_for_selector(".nm-sae[data-list]", timeout=10_000)


def shown_contexts(page) -> list[dict]:
    """Each drawn context: its tokens' texts and activations, and which token is marked."""
    return page.eval_on_selector_all(".nm-sae-context", """lines => lines.map((line) => {
      const spans = [...line.querySelectorAll('.nm-sae-token')];
      return { texts: spans.map(s => s.textContent), acts: spans.map(s => Number(s.dataset.act)),
               marked: spans.findIndex(s => s.classList.contains('nm-sae-mark')) };
    })""")


def expected_contexts(stats, latent: int) -> list:
    return stats.top_contexts(latent) + [c for interval in stats.intervals(latent) for c in interval.contexts]


def assert_dashboard_of(page, stats, latent: int) -> None:
    assert page.inner_text(".nm-sae-name") == f"latent {latent}"
    drawn, expected = shown_contexts(page), expected_contexts(stats, latent)
    assert len(drawn) == len(expected) > 0
    for line, context in zip(drawn, expected):
        assert line["texts"] == [t.replace("\n", "\u21b5") for t in context.tokens]
        assert line["acts"] == pytest.approx(context.activations, rel=1e-3, abs=1e-3)  # sent as float16
        assert line["marked"] == context.marked


def test_the_static_browser_renders_offline_and_hostile_tokens_stay_text(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    assert page.errors == [] and page.external_requests == []
    assert page.evaluate("window.__nm_pwned") is None
    assert page.locator(".nm-fallback").count() == 0
    first = stats.browser().features[0]
    assert page.get_attribute(".nm-sae", "data-ready") == str(first)
    assert_dashboard_of(page, stats, first)
    texts = set(page.eval_on_selector_all(".nm-sae-token, .nm-sae-logit-token", "spans => spans.map(s => s.textContent)"))
    for hostile in HOSTILE:
        assert any(text.startswith(hostile) for text in texts), hostile
    assert page.locator(".nm-sae-table tbody tr").count() == 96
    assert "dashboards of 32 of 96 latents embedded" in page.inner_text(".nm-note")
    bins = int((stats.histogram[first] > 0).sum())
    assert page.locator(".nm-sae-hist rect").count() == bins
    page.screenshot(path=str(ARTIFACTS / "static-sae-browser.png"), full_page=True)


def test_clicking_a_latent_opens_its_dashboard(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    browser = stats.browser()
    other = browser.features[5]
    page.click(f".nm-sae-table tr[data-latent='{other}']")
    page.wait_for_selector(f".nm-sae[data-ready='{other}']")
    assert_dashboard_of(page, stats, other)
    assert page.get_attribute(".nm-sae-table tr.nm-sae-current", "data-latent") == str(other)
    absent = next(latent for latent in stats.latents.tolist() if latent not in browser.features)
    page.click(f".nm-sae-table tr[data-latent='{absent}']")
    page.wait_for_selector(f".nm-sae[data-ready='error:{absent}']")
    assert f"latent {absent} is not embedded in this static view" in page.inner_text(".nm-sae-dash")
    assert page.errors == []


def test_clicking_a_token_lists_the_latents_most_active_on_it(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    latent = stats.browser().features[0]
    context = stats.top_contexts(latent)[0]
    page.click(".nm-sae-context[data-context='0'] .nm-sae-mark")
    listed = page.eval_on_selector_all(".nm-sae-picked .nm-sae-feature", "buttons => buttons.map(b => Number(b.dataset.latent))")
    expected = stats.features_on(context.row)[:5]
    assert listed == [f for f, _ in expected] and latent in listed
    assert page.inner_text(".nm-sae-picked-head") == f"latents most active on \u201c{context.tokens[context.marked]}\u201d"
    values = page.eval_on_selector_all(".nm-sae-picked .nm-sae-feature", "buttons => buttons.map(b => b.textContent)")
    assert [float(v.split("\u00b7")[1]) for v in values] == pytest.approx([v for _, v in expected], rel=2e-3)
    target = next((f for f in listed if f != latent and f in stats.browser().features), None)
    if target is not None:  # one of them is embedded: it opens
        page.click(f".nm-sae-picked .nm-sae-feature[data-latent='{target}']")
        page.wait_for_selector(f".nm-sae[data-ready='{target}']")
        assert_dashboard_of(page, stats, target)
    page.screenshot(path=str(ARTIFACTS / "static-sae-token.png"), full_page=True)
    assert page.errors == []


def test_the_keyboard_reaches_a_tokens_latents(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    context = stats.top_contexts(stats.browser().features[0])[0]
    listed = lambda: page.eval_on_selector_all(".nm-sae-picked .nm-sae-feature", "bs => bs.map(b => Number(b.dataset.latent))")
    page.focus(".nm-sae-context[data-context='0']")
    page.keyboard.press("Enter")
    assert listed() == [f for f, _ in stats.features_on(context.row)[:5]]
    step = 1 if context.marked + 1 < len(context.ids) else -1
    page.focus(".nm-sae-context[data-context='0']")
    page.keyboard.press("ArrowRight" if step == 1 else "ArrowLeft")
    page.keyboard.press("ArrowRight" if step == 1 else "ArrowLeft")
    page.keyboard.press("Space")
    moved = min(len(context.ids) - 1, context.marked + 2) if step == 1 else max(0, context.marked - 2)
    assert listed() == [f for f, _ in stats.features_on(context.row - context.marked + moved)[:5]]
    assert page.errors == []


def test_the_table_sorts_and_searches_by_token(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    rows = lambda: page.eval_on_selector_all(".nm-sae-table tbody tr", "rows => rows.map(r => Number(r.dataset.latent))")
    by = lambda values, sign: sorted(stats.latents.tolist(), key=lambda i: (sign * float(values[i]), i))
    assert rows() == by(stats.max, -1)
    page.click("th[data-sort='density']")
    assert rows() == by(stats.density, -1)
    page.click("th[data-sort='density']")
    assert rows() == by(stats.density, 1)
    page.click("th[data-sort='latent']")
    assert rows() == list(range(96))
    # a search finds the latents whose top contexts peak on a token, or whose decoder promotes it, with that text
    latent = stats.browser().features[0]
    context = stats.top_contexts(latent)[0]
    query = context.tokens[context.marked]
    page.fill(".nm-sae-search", query)
    found = set(rows())
    expected = set()
    for i in range(96):
        peaks = stats.tokens[stats.top_rows[i][stats.top_rows[i] >= 0]].tolist()
        common = [t for t, _ in collections.Counter(peaks).most_common(SEARCH_TOKENS)]
        ids = common + stats.logits["top_ids"][i, :SEARCH_TOKENS].tolist()
        if any(query.strip().lower() in text.strip().lower() for text in stats.texts(ids)):
            expected.add(i)
    assert latent in found and found == expected
    assert page.inner_text(".nm-sae-count") == f"{len(expected)} of 96 latents match"
    page.fill(".nm-sae-search", "17")
    assert 17 in rows()
    assert page.errors == []


def test_highlighted_tokens_keep_readable_text(page, stats, tmp_path):
    open_view(page, tmp_path, stats)
    measured = text_contrasts(page.locator(".nm-sae-token"))
    assert len(measured) > 50
    low = [(ratio, item) for ratio, item in measured if ratio < wcag.AA]
    assert not low, low[:3]
    for selector in (".nm-sae-stats", ".nm-note", ".nm-sae-table td", ".nm-sae-logit-token", ".nm-sae-group h4"):
        for ratio, item in text_contrasts(page.locator(selector)):
            assert ratio >= wcag.AA, (selector, ratio, item)


def test_a_single_dashboard_page(page, stats, tmp_path):
    latent = int(stats.count.argmax())
    open_view(page, tmp_path, stats.dashboard(latent), "dashboard.html", browser=False)
    assert page.locator(".nm-sae-table").count() == 0 or not page.is_visible(".nm-sae-table")
    assert_dashboard_of(page, stats, latent)
    groups = page.eval_on_selector_all(".nm-sae-group h4", "hs => hs.map(h => h.textContent)")
    assert groups[0] == f"top activations ({len(stats.top_contexts(latent))})"
    assert len(groups) == 1 + len(stats.intervals(latent)) and all("of activations" in g for g in groups[1:])
    assert page.errors == [] and page.external_requests == []


def test_a_dead_latent_and_statistics_without_token_lists_render_too(page, stats, tmp_path):
    dead = int(stats.dead[0])
    open_view(page, tmp_path, stats.dashboard(dead), "dead.html", browser=False)
    assert page.inner_text(".nm-sae-name") == f"latent {dead}" and "fires on 0% of tokens" in page.inner_text(".nm-sae-head")
    assert page.locator(".nm-sae-context").count() == 0 and page.locator(".nm-sae-hist rect").count() == 0
    lean = feature_statistics(make_sae(), stats_model(), torch.randint(3, 512, (8, 24)), **{**SETTINGS, "token_features": 0})
    latent = int(lean.count.argmax())
    open_view(page, tmp_path, lean.dashboard(latent), "lean.html", browser=False)
    page.click(".nm-sae-context[data-context='0'] .nm-sae-mark")
    assert "kept no latents per token" in page.inner_text(".nm-sae-picked")
    assert page.errors == [] and page.external_requests == []


# A stand-in for anywidget's model: bytes arrive as DataViews, as anywidget delivers traitlets.Bytes; setting
# `feature` answers with that latent's payload, as the kernel does.
HARNESS = """
async ({ state, payloads, esm }) => {
  const bytes = (text) => { const raw = Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); return new DataView(raw.buffer); };
  const values = { ...state, list_data: bytes(state.list_data), payload: bytes(state.payload) };
  const listeners = {};
  const fire = (key) => (listeners[`change:${key}`] || []).forEach((f) => f());
  const model = {
    get: (k) => values[k],
    set: (k, v) => { values[k] = v; },
    save_changes() {
      const latent = values.feature;
      if (payloads[latent] && values.payload_key !== latent) {
        setTimeout(() => { values.payload = bytes(payloads[latent]); values.payload_key = latent; fire("payload"); }, 10);
      }
    },
    on: (e, f) => { (listeners[e] = listeners[e] || []).push(f); }, off() {},
  };
  const url = URL.createObjectURL(new Blob([esm], { type: "text/javascript" }));
  const module = await import(url);
  const el = document.createElement("div");
  document.body.append(el);
  module.default.render({ model, el });
}
"""


def test_the_widget_front_end_renders_from_binary_buffers(page, stats):
    widget = stats.browser().widget()
    encode = lambda data: base64.b64encode(data).decode()
    first = widget.feature
    state = {key: getattr(widget, key) for key in ("mode", "title", "note", "feature", "payload_key", "error")}
    state.update(list_data=encode(widget.list_data), payload=encode(widget.payload))
    others = [latent for latent in stats.browser().features[1:3]]
    payloads = {}
    for latent in others:
        widget.feature = latent
        payloads[latent] = encode(widget.payload)
    page.goto("about:blank")
    page.add_style_tag(content=widget._css)
    page.evaluate(HARNESS, {"state": state, "payloads": payloads, "esm": widget._esm})
    page.wait_for_selector(f".nm-sae[data-ready='{first}']")
    page.wait_for_selector(".nm-sae[data-list='96']")
    assert_dashboard_of(page, stats, first)
    page.click(f".nm-sae-table tr[data-latent='{others[1]}']")
    page.wait_for_selector(f".nm-sae[data-ready='{others[1]}']")
    assert_dashboard_of(page, stats, others[1])
    assert page.errors == [] and page.external_requests == []


def test_without_javascript_the_plain_summary_shows(browser, stats, tmp_path):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    path = tmp_path / "plain.html"
    stats.save_html(path)
    page.goto(path.as_uri())
    assert page.locator(".nm-fallback").count() == 1
    text = page.inner_text(".nm-fallback")
    assert "latent" in text and "To browse the features, run this cell" in text
    assert any(hostile in text for hostile in HOSTILE)  # shown as text
    assert page.locator(".nm-fallback svg rect").count() > 0 and page.locator(".nm-fallback img").count() == 0
    page.screenshot(path=str(ARTIFACTS / "static-sae-no-javascript.png"), full_page=True)
    context.close()
