"""The shared line chart: points placed to scale, gaps for non-finite values, bands, marks, escaping, plotly twin."""

import math
import re

import pytest

from neuronmap.linechart import PALETTE, line_chart_figure, line_chart_svg


def _circles(svg: str) -> list[tuple[float, float, str]]:
    return [(float(x), float(y), tip) for x, y, tip in
            re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="2.5" fill="[^"]+"><title>([^<]*)</title>', svg)]


def test_points_are_placed_to_scale_on_both_axes():
    svg = line_chart_svg([0, 1, 4], {"a": [0.0, 0.5, 1.0]}, width=420, height=180)
    (x0, y0, _), (x1, y1, _), (x4, y4, _) = _circles(svg)
    assert x0 == pytest.approx(44) and x4 == pytest.approx(420 - 8)
    assert (x1 - x0) / (x4 - x0) == pytest.approx(0.25, abs=0.01)  # numeric x is placed to scale
    assert y0 > y1 > y4 and (y0 - y1) == pytest.approx(y1 - y4, abs=0.2)


def test_label_x_is_spaced_evenly_and_a_non_finite_value_splits_the_line():
    svg = line_chart_svg(["emb", "L0", "L1", "L2"], {"acc": [0.5, math.nan, 0.7, 0.9]})
    assert len(_circles(svg)) == 3
    assert svg.count("<polyline") == 2  # one run before the gap, one after
    xs = [x for x, _, _ in _circles(svg)]
    assert xs[2] - xs[1] == pytest.approx((xs[1] - xs[0]) / 2, abs=0.2)


def test_bands_marks_legend_and_colours():
    svg = line_chart_svg([1, 2, 3], {"probe": [0.6, 0.8, 0.9], "control": [0.5, 0.5, 0.6]},
                         bands={"probe": ([0.5, 0.7, 0.85], [0.7, 0.9, 0.95])}, marks={"chance": 0.5},
                         title="accuracy by layer", y_label="accuracy")
    assert svg.count("<polygon") == 1 and f'fill="{PALETTE[0]}" fill-opacity' in svg
    assert 'stroke-dasharray="4 3"><title>chance: 0.5</title>' in svg
    assert "probe" in svg and "control" in svg and "accuracy by layer" in svg
    assert f'stroke="{PALETTE[1]}"' in svg


def test_every_label_is_escaped():
    hostile = "<script>alert(1)</script>"
    svg = line_chart_svg([hostile, "b"], {hostile: [1.0, 2.0]}, title=hostile, x_label=hostile, y_label=hostile,
                         marks={hostile: 1.5})
    assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_mismatched_lengths_and_unknown_bands_are_refused():
    with pytest.raises(ValueError, match="series 'a' has 2 values for 3 x values"):
        line_chart_svg([1, 2, 3], {"a": [1, 2]})
    with pytest.raises(ValueError, match="band 'b' names no series; series: a"):
        line_chart_svg([1, 2], {"a": [1, 2]}, bands={"b": ([0, 0], [1, 1])})


def test_the_figure_has_one_trace_per_series_and_band():
    figure = line_chart_figure([1, 2, 3], {"a": [1.0, math.inf, 3.0], "b": [0.0, 1.0, 2.0]},
                               bands={"a": ([0, 0, 0], [2, 2, 4])}, marks={"zero": 0.0})
    names = [trace.name for trace in figure.data]
    assert names == [None, "a", "b"]
    assert list(figure.data[1].y) == [1.0, None, 3.0]
    assert figure.layout.shapes[0].y0 == 0.0


def test_end_labels_grow_inwards_so_the_svg_does_not_cut_them():
    svg = line_chart_svg(["embedding", "middle", "last layer"], {"a": [1.0, 2.0, 3.0]})
    anchors = re.findall(r'text-anchor="(\w+)">(embedding|middle|last layer)</text>', svg)
    assert anchors == [("start", "embedding"), ("middle", "middle"), ("end", "last layer")]


def test_hook_names_are_compacted_on_the_axis_and_kept_whole_in_tooltips():
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]
    svg = line_chart_svg(hooks, {"accuracy": [0.5, 0.8, 1.0]})
    ticks = re.findall(r'text-anchor="\w+">([^<]*)</text>', svg)
    assert ["0.resid_pre", "0.resid_mid", "1.resid_post"] == [t for t in ticks if "resid" in t]
    assert [tip.split(" at ")[1].split(":")[0] for _, _, tip in _circles(svg)] == hooks
