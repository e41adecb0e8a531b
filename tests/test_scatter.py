"""The shared scatter view: escaped tooltips, a bounded number of points, legend and colour bar, plotly 2D and 3D."""

from __future__ import annotations

import re

import numpy as np
import pytest

from neuronmap.display import relative_luminance
from neuronmap.errors import InputError
from neuronmap.linechart import PALETTE
from neuronmap.scatter import OTHER, scatter_figure, scatter_svg


def _points(n: int, columns: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, columns))


def test_hover_text_is_escaped_in_tooltips():
    hover = ["<script>alert(1)</script>", 'a "quoted" & <b>bold</b> token', "plain"]
    page = scatter_svg(_points(3), hover=hover, colours_by=["<img src=x>", "b", "b"], title="<i>t</i>")
    assert "<script>" not in page and "<img" not in page and "<b>" not in page and "<i>t" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x&gt;" in page
    titles = re.findall(r"<circle[^>]*><title>(.*?)</title></circle>", page, re.S)
    assert len(titles) == 3 and "&quot;quoted&quot; &amp; &lt;b&gt;" in titles[1]
    figure = scatter_figure(_points(3), hover=hover)
    assert "<script>" not in "".join(figure.data[0].hovertext)


def test_at_most_max_points_are_drawn_with_a_note():
    page = scatter_svg(_points(5000), max_points=300, seed=1)
    assert page.count("<circle") == 300 and "showing 300 of 5,000 points" in page
    assert scatter_svg(_points(5000), max_points=300, seed=1) == page  # the same seed, the same subsample
    assert scatter_svg(_points(5000), max_points=300, seed=2) != page
    small = scatter_svg(_points(50), max_points=300)
    assert small.count("<circle") == 50 and "showing" not in small
    figure = scatter_figure(_points(5000), max_points=1000)
    assert len(figure.data[0].x) == 1000 and "showing 1,000 of 5,000 points" in figure.layout.title.text


def test_a_legend_lists_each_label_with_its_count_and_colour():
    labels = ["cat"] * 5 + ["dog"] * 3 + ["eel"] * 2
    page = scatter_svg(_points(10), colours_by=labels)
    for name, count in (("cat", 5), ("dog", 3), ("eel", 2)):
        assert f"{name} ({count})" in page
    fills = re.findall(r'<circle[^>]*fill="(#[0-9a-f]{6})"', page)
    assert [fills[i] for i in (0, 5, 8)] == list(PALETTE[:3]) and len(set(fills)) == 3
    figure = scatter_figure(_points(10), colours_by=labels)
    assert [trace.name for trace in figure.data] == ["cat", "dog", "eel"]
    assert [len(trace.x) for trace in figure.data] == [5, 3, 2]


def test_rare_labels_beyond_the_palette_share_other():
    labels = [f"t{i}" for i in range(12) for _ in range(12 - i)]  # 12 labels, t0 most frequent
    page = scatter_svg(_points(len(labels)), colours_by=labels)
    kept = len(PALETTE) - 1
    rest = sum(12 - i for i in range(kept, 12))
    assert f"other ({rest})" in page and "t0 (12)" in page and f"t{kept} (" not in page
    assert page.count(f'fill="{OTHER}"') == rest


def test_numbers_get_a_colour_bar_with_readable_text():
    values = np.linspace(-2.0, 3.0, 40)
    page = scatter_svg(_points(40), colours_by=values)
    assert "colour:" in page and "-3" in page and ">3<" in page  # diverging scale symmetric around 0
    for background, text in re.findall(r"background:(#[0-9a-f]{6});color:(#000|#fff)", page):
        rgb = [int(background[i : i + 2], 16) for i in (1, 3, 5)]
        light, text_light = relative_luminance(rgb), 1.0 if text == "#fff" else 0.0
        assert (max(light, text_light) + 0.05) / (min(light, text_light) + 0.05) >= 4.5


def test_three_columns_make_a_3d_figure():
    figure = scatter_figure(_points(20, 3), colours_by=[0, 1] * 10, z_label="PC3")
    assert {trace.type for trace in figure.data} == {"scatter3d"}
    assert figure.layout.scene.zaxis.title.text == "PC3"
    with pytest.raises(InputError, match=r"\[n, 2\]"):
        scatter_svg(_points(20, 3))


def test_bad_input_is_named():
    with pytest.raises(InputError, match="one label or value per point"):
        scatter_svg(_points(5), colours_by=[1, 2])
    with pytest.raises(InputError, match="one text per point"):
        scatter_svg(_points(5), hover=["a"])
    with pytest.raises(InputError, match="finite"):
        scatter_svg(np.array([[0.0, np.nan]]))
