"""The shared heatmap in a real browser: hostile token labels stay text, wide grids scroll inside their output,
hovering a cell tells its value, and every text is readable."""

from __future__ import annotations

import pytest
import torch

import wcag
from neuronmap.heatmap import heatmap_html
from test_browser_attention import ARTIFACTS, text_contrasts

pytestmark = pytest.mark.browser

HOSTILE = ["<script>window.pwned=1</script>", "<img src=x onerror=pwned=2>", "\"&<>'"]
TOKENS = ["<|endoftext|>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John", " gave",
          " a", " drink", " to", *HOSTILE, "\n", " Mary"]


def sweep(rows: int = 12, columns: int = 20, seed: int = 0) -> torch.Tensor:
    """Signed values that grow along the prompt, like a patching sweep's, with one blank cell."""
    values = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.3, 1.5, columns)
    values[3, 5] = float("nan")
    return values


def show(page, tmp_path, heatmap: str, width: int = 1000) -> None:
    """Open `heatmap` inside an output-like box `width` pixels wide, in a 1100-pixel-wide window."""
    path = tmp_path / "heatmap.html"
    path.write_text(
        f"<!doctype html><meta charset='utf-8'><body style='margin:8px'><div id='output' style='width:{width}px'>{heatmap}</div></body>",
        encoding="utf-8",
    )
    page.set_viewport_size({"width": 1100, "height": 800})
    page.goto(path.as_uri())


def diverging(values: torch.Tensor, columns: list[str]) -> str:
    return heatmap_html(
        values, [str(layer) for layer in range(values.shape[0])], columns, title="logit difference recovered",
        description="patching blocks.{L}.hook_resid_pre, clean into corrupted", row_title="layer", column_title="position",
        diverging=True,
    )


def test_script_labels_run_nothing_and_show_as_text(page, tmp_path):
    show(page, tmp_path, diverging(sweep(), TOKENS))
    assert page.evaluate("window.pwned") is None
    assert page.errors == [] and page.external_requests == []
    assert page.locator(".nm-heatmap script, .nm-heatmap img").count() == 0
    headers = page.eval_on_selector_all(".nm-heatmap thead th:not(.nm-hm-corner)", "cells => cells.map(c => c.textContent)")
    assert headers[15:18] == HOSTILE and headers[2] == "\u2423Mary" and headers[18] == "\u21b5"
    assert page.locator(".nm-heatmap thead th").nth(16).get_attribute("title") == f"position: {HOSTILE[0]}"


def test_a_small_heatmap_fits_and_a_wide_one_scrolls_inside_its_output(page, tmp_path):
    show(page, tmp_path, diverging(sweep(), TOKENS), width=1000)
    box = page.locator(".nm-hm-scroll").evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert box[0] <= box[1]  # 20 positions with their values fit a 1000-pixel output
    show(page, tmp_path, diverging(sweep(12, 400), [f" t{i}" for i in range(400)]), width=600)
    sizes = page.evaluate(
        """() => {
          const scroll = document.querySelector('.nm-hm-scroll'), output = document.getElementById('output');
          return { page: document.documentElement.scrollWidth, window: window.innerWidth, scroll: scroll.scrollWidth,
                   client: scroll.clientWidth, right: document.querySelector('.nm-heatmap').getBoundingClientRect().right,
                   edge: output.getBoundingClientRect().right };
        }"""
    )
    assert sizes["page"] <= sizes["window"], sizes  # the page itself never scrolls sideways
    assert sizes["client"] <= 600 < sizes["scroll"], sizes  # the grid scrolls inside the output
    assert sizes["right"] <= sizes["edge"] + 0.5, sizes
    page.locator(".nm-hm-scroll").evaluate("e => { e.scrollLeft = e.scrollWidth; }")
    row_header = page.locator("tbody th").first.bounding_box()
    assert row_header["x"] >= page.locator("#output").bounding_box()["x"] - 0.5  # the row labels stay in view


def test_hovering_a_cell_tells_its_row_column_and_exact_value(page, tmp_path):
    values = sweep()
    show(page, tmp_path, diverging(values, TOKENS))
    page.locator("tbody tr").nth(7).locator("td").nth(2).hover()
    hovered = page.evaluate("(() => { const cell = document.querySelector('td:hover'); return cell && cell.title; })()")
    assert hovered.split("\n")[:2] == ["layer: 7", "position: \u2423Mary"]
    assert float(hovered.split("\n")[2].removeprefix("value: ")) == pytest.approx(float(values[7, 2]), rel=1e-6)
    assert page.get_by_title(hovered, exact=True).count() == 1  # the title is the cell's accessible description
    blank = page.locator("tbody tr").nth(3).locator("td").nth(5)
    assert blank.get_attribute("title").endswith("value: nan") and blank.inner_text() == ""


def test_every_text_is_readable_and_the_screenshot_is_taken(page, tmp_path):
    show(page, tmp_path, diverging(sweep(), TOKENS))
    for selector in ("tbody td", ".nm-hm-title", ".nm-hm-desc", "thead th", "tbody th", ".nm-hm-ticks span"):
        measured = text_contrasts(page.locator(selector))
        assert measured, selector
        low = [(ratio, item) for ratio, item in measured if ratio < wcag.AA]
        assert not low, (selector, low[:3])
    page.locator(".nm-heatmap").screenshot(path=str(ARTIFACTS / "heatmap-diverging.png"))
    assert page.errors == []
