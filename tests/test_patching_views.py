"""Patching results render: hostile tokens stay text in Chromium, and the static view stays bounded at 64 × 1024."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.heatmap import MAX_HTML_BYTES
from neuronmap.patching.cells import Cell, Plan
from neuronmap.patching.result import PatchingResult
from test_patching import CLEAN, CORRECT, CORRUPT, WRONG, load

HOSTILE = "<script>window.pwned = 1</script>"
QUOTES = "&<>\"'"


def _result(n_layers: int, n_positions: int, seed: int = 0) -> PatchingResult:
    labels = [f"{p} {HOSTILE if p % 2 else QUOTES}" for p in range(n_positions)]
    plan = Plan([Cell("x", 0, ())] * (n_layers * n_positions), [("layer", [str(l) for l in range(n_layers)]), ("position", labels)], "resid_pre", "layer_pos")
    per_prompt = torch.randn(n_layers * n_positions, 2, generator=torch.Generator().manual_seed(seed))
    return PatchingResult(plan, per_prompt, torch.tensor([2.0]), torch.tensor([-1.0]), nm.patching.logit_diff(0, 1), "denoise", "m", 3)


def test_the_static_view_of_64_layers_by_1024_positions_is_bounded_and_says_what_it_shows():
    result = _result(64, 1024)
    html = result._repr_html_()
    assert len(html.encode()) <= MAX_HTML_BYTES
    assert HOSTILE not in html
    assert "1024" in html  # the note says how the positions were grouped


def test_the_view_names_what_was_patched_and_the_baselines():
    model = load("gpt2")
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "z", "layer_head_pos", progress=False)
    html = result._repr_html_()
    assert "z by layer × head × position" in html and "0 = the corrupted run" in html
    assert "layer 0" in html and "layer 1" in html  # one panel per layer
    figure = result.figure()
    assert len(figure.data) == 2 and figure.layout.coloraxis.cmid == 0


@pytest.mark.browser
def test_hostile_tokens_are_text_in_the_heatmap(page, tmp_path):
    path = tmp_path / "patching.html"
    _result(3, 8).save_html(path)
    page.goto(path.as_uri())
    assert page.evaluate("window.pwned") is None
    assert "<script>window.pwned" in page.inner_text("body")  # shown as text (labels are cut to a width)
    assert not page.evaluate("[...document.scripts].some(s => s.textContent.includes('pwned'))")
    assert page.errors == [] and page.external_requests == []
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"]
