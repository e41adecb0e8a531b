"""The shared heatmap view: escaping, colour scales by hand, WCAG contrast, NaN, blocks and the size bound, plotly."""

from __future__ import annotations

import html
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import wcag
from neuronmap.errors import InputError
from neuronmap.heatmap import MAX_CELLS, MAX_HTML_BYTES, heatmap_figure, heatmap_html

SCRIPT_TOKEN = "<script>alert(1)</script>"
QUOTES_TOKEN = "\"&<>'"


def render(values, rows=None, columns=None, *, diverging=True, **options) -> str:
    values = torch.as_tensor(values)
    rows = rows if rows is not None else [str(i) for i in range(values.shape[-2])]
    columns = columns if columns is not None else [f" t{i}" for i in range(values.shape[-1])]
    options = {"title": "logit difference", "row_title": "layer", "column_title": "position", **options}
    return heatmap_html(values, rows, columns, diverging=diverging, **options)


class _Cells(HTMLParser):
    """Every `<td>` in document order as {"style": {...}, "class", "title", "text"}, and every element's text."""

    def __init__(self):
        super().__init__()
        self.cells, self.texts, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "td":
            attrs = dict(attrs)
            style = dict(part.split(":", 1) for part in (attrs.get("style") or "").split(";") if part)
            self.cells.append({"style": style, "class": attrs.get("class"), "title": attrs.get("title"), "text": ""})

    def handle_data(self, data):
        self.texts.append(data)
        if self.cells and self.tags and self.tags[-1] == "td":
            self.cells[-1]["text"] += data

    def handle_endtag(self, tag):
        self.tags.append(f"/{tag}")


def cells(page: str) -> list[dict]:
    parser = _Cells()
    parser.feed(page)
    return parser.cells


def texts(page: str) -> list[str]:
    """Every text node of the page, without surrounding whitespace."""
    parser = _Cells()
    parser.feed(page)
    return [text.strip() for text in parser.texts]


def white_to(end: tuple[int, int, int], depth: float) -> str:
    """The colour `depth` of the way from white to `end`, each sRGB channel linearly, as #rrggbb."""
    return "#" + "".join(f"{round(255 - depth * (255 - c)):02x}" for c in end)


def test_hostile_labels_and_titles_never_appear_unescaped():
    hostile = [SCRIPT_TOKEN, QUOTES_TOKEN, "a&b"]
    values = torch.randn(2, 2, 3)
    values[0, 0, 0] = math.nan  # a blank cell's title is escaped too
    page = render(
        values, ["<b>row</b>", QUOTES_TOKEN], hostile, panels=[SCRIPT_TOKEN, "<i>p</i>"],
        title=SCRIPT_TOKEN, row_title="<u>", column_title=QUOTES_TOKEN, description=SCRIPT_TOKEN, note=QUOTES_TOKEN,
    )
    for raw in (SCRIPT_TOKEN, QUOTES_TOKEN, "<b>row</b>", "<i>p</i>", "<u>", "a&b"):
        assert raw not in page
    assert "<script" not in page.lower() and "<b>" not in page and "<i>" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&quot;&amp;&lt;&gt;&#x27;" in page and "a&amp;b" in page
    parser = _Cells()
    parser.feed(page)
    assert SCRIPT_TOKEN in parser.texts  # shown as text, decoded back to the token by an HTML parser
    assert {cell["title"].split("\n")[1] for cell in parser.cells} == {f"{QUOTES_TOKEN}: {label}" for label in hostile}


def test_labels_keep_their_spaces_visible_and_line_breaks_on_one_line():
    page = render([[1.0, 2.0, 3.0, 4.0]], columns=[" the", "cat ", "\n", "a\tb"])
    headers = [text for text in texts(page) if text in ("\u2423the", "cat\u2423", "\u21b5", "a\u21e5b")]
    assert headers == ["\u2423the", "cat\u2423", "\u21b5", "a\u21e5b"]
    assert "position: \u2423the" in cells(page)[0]["title"]


def test_diverging_colours_are_white_at_zero_blue_below_red_above_symmetric_in_the_largest_magnitude():
    page = render([[-4.0, -1.0, 0.0, 1.0, 2.0]])  # scale ±4: -4 is the darkest blue, +4 would be the darkest red
    colours = [cell["style"]["background"] for cell in cells(page)]
    blue, red = (33, 102, 172), (178, 24, 43)
    # by hand: 255 - depth * (255 - channel); -1 is a quarter of the way to blue: 255 - 0.25 * 222 = 199.5 -> 200, ...
    assert colours == ["#2166ac", white_to(blue, 0.25), "#ffffff", white_to(red, 0.25), white_to(red, 0.5)]
    assert colours[1] == "#c8d9ea" and colours[3] == "#ecc5ca" and colours[4] == "#d88c95"


def test_the_largest_magnitude_gets_the_darkest_colour_and_sign_picks_the_hue():
    values = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    values[2, 3] = 5.0  # the largest |value|: full red
    found = cells(render(values))
    lightness = [wcag.luminance(wcag.rgba(cell["style"]["background"])[:3]) for cell in found]
    assert found[2 * 9 + 3]["style"]["background"] == "#b2182b"
    assert min(range(len(found)), key=lightness.__getitem__) == 2 * 9 + 3
    for value, cell in zip(values.flatten().tolist(), found):
        r, _, b, _ = wcag.rgba(cell["style"]["background"])
        assert (r > b) == (value > 0) and (b > r) == (value < 0)
    mirrored = cells(render(-values))
    assert mirrored[2 * 9 + 3]["style"]["background"] == "#2166ac"


def test_sequential_colours_run_from_white_at_the_lowest_to_blue_at_the_highest():
    found = cells(render([[0.5, 1.0, 2.5]], diverging=False))
    assert [cell["style"]["background"] for cell in found] == ["#ffffff", white_to((33, 102, 172), 0.25), "#2166ac"]


def test_every_cell_text_takes_the_colour_that_contrasts_most_and_reaches_aa():
    values = torch.linspace(-3, 3, 301).reshape(7, 43)  # every depth of both hues, 43 columns
    for diverging in (True, False):
        found = cells(render(values[:, :30], diverging=diverging))  # 30 columns: values printed in the cells
        assert len(found) == 210 and all(cell["text"] for cell in found)
        for cell in found:
            background = wcag.rgba(cell["style"]["background"])
            assert background[3] == 1.0  # opaque: a dark theme's page does not show through
            text = wcag.rgba(cell["style"]["color"])[:3]
            best = max(wcag.contrast((0, 0, 0), background[:3]), wcag.contrast((255, 255, 255), background[:3]))
            assert wcag.contrast(text, background[:3]) == pytest.approx(best) and best >= wcag.AA


def test_nan_cells_are_blank_and_do_not_move_the_scale():
    values = torch.tensor([[math.nan, -2.0], [1.0, math.nan]])
    found = cells(render(values))
    assert found[0]["style"] == {} and found[0]["text"] == "" and found[0]["class"] == "nm-hm-nan"
    assert found[0]["title"].endswith("value: nan")
    assert found[1]["style"]["background"] == "#2166ac"  # the largest finite magnitude
    assert "no value" in texts(render(values)) and "no value" not in texts(render([[1.0, 2.0]]))
    assert len(cells(render(torch.full((2, 3), math.nan)))) == 6  # nothing to scale: still renders


def test_cells_print_rounded_values_and_titles_the_exact_ones():
    value = np.float32(0.123456789)
    found = cells(render(torch.tensor([[float(value), -0.001, 2.0]], dtype=torch.float32)))
    assert [cell["text"] for cell in found] == ["0.12", "0.00", "2.00"]  # no "-0.00"
    assert found[0]["title"] == f"layer: 0\nposition: \u2423t0\nvalue: {value!s}"  # shortest float32 repr
    assert float(found[0]["title"].rsplit(": ", 1)[1]) == pytest.approx(float(value), rel=1e-7)
    assert [cell["text"] for cell in cells(render([[0.5]], value_format=".1%"))] == ["50.0%"]


@pytest.mark.parametrize("n_columns", [1024, 4096])
def test_a_large_grid_stays_under_the_bound_and_says_what_it_merged(n_columns):
    values = torch.randn(64, n_columns, generator=torch.Generator().manual_seed(1))
    page = render(values, columns=[f" tok{i}" for i in range(n_columns)])
    assert len(page.encode("utf-8")) < MAX_HTML_BYTES
    found = cells(page)
    assert len(found) <= MAX_CELLS and len(found) % 64 == 0  # every row kept, columns merged
    per_cell = n_columns // (len(found) // 64)
    note = html.unescape(page[page.index('class="nm-hm-note"'):])
    assert f"64 × {n_columns} values shown as 64 × {len(found) // 64} cells" in note
    assert f"a block of 1 row × {per_cell} columns" in note
    block = values[5, per_cell : 2 * per_cell]  # row 5, second block: its value of largest magnitude
    largest = float(block[block.abs().argmax()])
    title = found[5 * (len(found) // 64) + 1]["title"]
    assert title.startswith(f"layer: 5\nposition {per_cell}–{2 * per_cell - 1}: \u2423tok{per_cell} … ")
    assert np.float32(title.rsplit(": ", 1)[1]) == np.float32(largest)  # the exact float32, round-tripped


def test_long_hostile_labels_are_cut_and_the_grid_drawn_coarser_to_stay_bounded():
    labels = [QUOTES_TOKEN * 50 + str(i) for i in range(4096)]  # 250 characters, each 5 to 6 bytes escaped
    page = render(torch.randn(64, 4096), rows=labels[:64], columns=labels, panels=None)
    assert len(page.encode("utf-8")) <= MAX_HTML_BYTES
    assert 0 < len(cells(page)) < MAX_CELLS and QUOTES_TOKEN not in page


def test_panels_share_one_scale_and_each_has_its_caption():
    values = torch.zeros(3, 2, 4)
    values[0, 0, 0], values[2, 1, 3] = 1.0, -4.0
    page = render(values, panels=["layer 0", "layer 1", "layer 2"])
    found = cells(page)
    assert len(found) == 24 and page.count('class="nm-hm-caption"') == 3 and "layer 2" in texts(page)
    assert found[0]["style"]["background"] == white_to((178, 24, 43), 0.25)  # 1 of 4, not stretched to red
    assert found[23]["style"]["background"] == "#2166ac"


def test_bad_shapes_and_labels_are_refused_with_what_was_given():
    with pytest.raises(InputError, match=r"shape \(3,\)"):
        heatmap_html(torch.ones(3), ["a"], ["b"], title="t", row_title="r", column_title="c", diverging=True)
    with pytest.raises(InputError, match="2 labels for the 3 rows"):
        render(torch.ones(3, 2), rows=["a", "b"])
    with pytest.raises(InputError, match="2 panel labels"):
        render(torch.ones(3, 2, 2), panels=["a", "b"])
    with pytest.raises(InputError, match="at least one value"):
        render(torch.ones(2, 0), columns=[])


def test_the_figure_holds_every_value_and_centres_a_diverging_scale_at_zero():
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    figure = heatmap_figure(
        values, ["0", "1", "2"], [" the", SCRIPT_TOKEN, "b", "c", "d"],
        title="sweep", row_title="layer", column_title="position", diverging=True,
    )
    assert (figure.data[0].z == values.numpy()).all()
    assert figure.layout.coloraxis.cmid == 0 and figure.data[0].coloraxis == "coloraxis"
    assert [stop[1] for stop in figure.layout.coloraxis.colorscale] == ["#2166ac", "#ffffff", "#b2182b"]
    assert figure.layout.xaxis.title.text == "position" and figure.layout.yaxis.title.text == "layer"
    assert list(figure.layout.xaxis.ticktext)[:2] == ["\u2423the", "&lt;script&gt;alert(1)&lt;/script&gt;"]
    assert figure.layout.yaxis.autorange == "reversed"  # the first row on top, as in the HTML
    assert tuple(figure.data[0].customdata[2, 1]) == ("2", "&lt;script&gt;alert(1)&lt;/script&gt;")


def test_a_sequential_figure_has_no_midpoint_and_panels_become_subplots():
    figure = heatmap_figure(
        torch.rand(2, 3, 4), range(3), range(4), panels=["L0", "L1"],
        title="scores", row_title="head", column_title="position", diverging=False,
    )
    assert figure.layout.coloraxis.cmid is None
    assert [stop[1] for stop in figure.layout.coloraxis.colorscale] == ["#ffffff", "#2166ac"]
    assert len(figure.data) == 2 and {trace.coloraxis for trace in figure.data} == {"coloraxis"}
    assert [annotation.text for annotation in figure.layout.annotations] == ["L0", "L1"]


def test_panels_of_different_quantities_get_a_colour_scale_each_beside_their_panel():
    values = torch.stack([torch.rand(3, 4), 100 * torch.rand(3, 4)])  # e.g. a score in [0, 1] and a distance in tokens
    figure = heatmap_figure(
        values, range(3), range(4), panels=["score", "distance"], title="scores", row_title="layer",
        column_title="head", diverging=False, shared_scale=False,
    )
    assert [trace.coloraxis for trace in figure.data] == ["coloraxis", "coloraxis2"]
    assert (figure.data[1].z == values[1].numpy()).all()
    for axis, yaxis in (("coloraxis", "yaxis"), ("coloraxis2", "yaxis2")):
        low, high = figure.layout[yaxis].domain
        bar = figure.layout[axis].colorbar
        assert bar.y == pytest.approx((low + high) / 2) and bar.len == pytest.approx(high - low)
        assert [stop[1] for stop in figure.layout[axis].colorscale] == ["#ffffff", "#2166ac"]
    assert figure.layout.coloraxis.cmin is None  # each scale spans its own panel's values (plotly's autoscale)
