"""Representation-analysis results in a real browser, offline: every static view draws its charts (scatter points,
curves, bars, heatmap cells, dendrogram), hostile labels and hover texts stay text, and nothing is fetched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuronmap as nm
from neuronmap.analysis.cluster_view import Clusters
from neuronmap.analysis.projection_view import Projection
from test_browser_attention import ARTIFACTS

pytestmark = pytest.mark.browser

HOSTILE = ["<script>window.pwned=1</script>", "<img src=x onerror=pwned=2>", "\"&<>'"]


def _blobs(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return rng.normal(size=(n, 6)) + 6 * np.eye(6)[labels], labels


def _open(page, tmp_path, name: str, html: str) -> None:
    path = tmp_path / f"{name}.html"
    path.write_text(f"<!doctype html><meta charset='utf-8'><body style='margin:8px;width:900px'>{html}</body>",
                    encoding="utf-8")
    page.set_viewport_size({"width": 1000, "height": 900})
    page.goto(path.as_uri())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"analysis-{name}.png"), full_page=True)
    assert page.errors == [] and page.external_requests == []
    assert page.evaluate("window.pwned") is None
    assert page.locator("body script, body img").count() == 0


def _tooltips(page) -> list[str]:
    return page.eval_on_selector_all("svg title", "titles => titles.map(t => t.textContent)")


def test_a_pca_projection_draws_every_point_its_curve_and_keeps_hover_text_as_text(page, tmp_path):
    x, labels = _blobs()
    hover = [HOSTILE[i % 3] + f" row {i}" for i in range(len(x))]
    projection = nm.analysis.pca(x, n_components=2, labels=np.array(HOSTILE)[labels])
    projection = Projection(projection.coordinates, "PCA", labels=projection.labels, hover=hover,
                            components=projection.components, mean=projection.mean,
                            eigenvalues=projection.eigenvalues)
    _open(page, tmp_path, "pca", projection._repr_html_())
    assert page.locator("svg circle").count() >= len(x)  # the scatter's points (+ the curve's markers)
    assert page.locator("svg polyline").count() >= 1  # the explained-variance curve
    tips = _tooltips(page)
    assert any(t.endswith(f"\n{HOSTILE[0]} row 0") for t in tips) and any(f"\n{HOSTILE[2]} row" in t for t in tips)
    assert all(label in page.inner_text("body") for label in HOSTILE)  # the legend shows the labels as text


def test_clusters_draw_the_scatter_and_the_dendrogram(page, tmp_path):
    x, _ = _blobs()
    clusters = nm.analysis.agglomerative(x, k=3)
    clusters = Clusters(clusters.labels, clusters.method, silhouette=clusters.silhouette,
                        calinski_harabasz=clusters.calinski_harabasz, coordinates=clusters.coordinates,
                        summaries=clusters.summaries, hover=[HOSTILE[i % 3] for i in range(len(x))],
                        linkage=clusters.linkage)
    _open(page, tmp_path, "clusters", clusters._repr_html_())
    assert page.locator("svg circle").count() == len(x)
    assert page.locator("svg path, svg polyline, svg line").count() > 10  # dendrogram links and axes
    assert any(t.endswith(f"\n{HOSTILE[0]}") for t in _tooltips(page))
    assert "silhouette" in page.inner_text("body")


def test_a_probe_curve_a_layer_summary_and_statistics_draw_their_charts(page, tmp_path):
    x, labels = _blobs(120)
    sets = {HOSTILE[0]: x, "noise": np.random.default_rng(1).normal(size=x.shape)}
    curve = nm.analysis.probe_by_layer(sets, labels, hooks="*", token_types=np.arange(len(x)) % 10)
    summary = nm.analysis.layer_summary(sets)
    statistics = nm.analysis.neuron_statistics(torch.from_numpy(x).relu())
    estimate = nm.analysis.bootstrap(lambda a: float(a.mean()), x[:, 0], n_resamples=200)
    _open(page, tmp_path, "curves", curve._repr_html_() + summary._repr_html_() + statistics._repr_html_()
          + estimate._repr_html_())
    assert page.locator("svg polyline").count() >= 3 + 2  # probe, control, selectivity; rank and norm curves
    assert page.locator("svg rect").count() >= 10  # the statistics' and the bootstrap's histograms
    text = page.inner_text("body")
    assert HOSTILE[0] in text and "selectivity" in text and "95% CI" in text


def test_a_similarity_matrix_and_mutual_information_render_offline(page, tmp_path):
    x, labels = _blobs()
    matrix = nm.analysis.similarity_matrix({HOSTILE[1]: x, "squared": x**2, "noise": np.random.default_rng(2).normal(
        size=x.shape)})
    information = nm.analysis.mutual_information(x, np.array(HOSTILE)[labels], permutations=50)
    _open(page, tmp_path, "similarity", matrix._repr_html_() + information._repr_html_())
    assert page.locator(".nm-heatmap td").count() >= 9
    text = page.inner_text("body")
    assert HOSTILE[1] in text and "cka" in text.lower()
