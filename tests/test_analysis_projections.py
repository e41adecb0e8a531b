"""Projections: PCA against scikit-learn (in memory and streamed from a store, for several block sizes), the
effective dimensionality against a planted spectrum, t-SNE against scikit-learn's, the views, and bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import neuronmap as nm
from neuronmap.analysis.projections import effective_dimensionality, pca, tsne, umap


def _data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 10


def _planted(spectrum: np.ndarray, n: int = 400, seed: int = 1) -> np.ndarray:
    """Rows whose covariance has exactly the eigenvalues `spectrum`, rotated at random and shifted."""
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    centred = rng.normal(size=(n, d))
    centred -= centred.mean(0)
    u, _ = np.linalg.qr(centred)  # orthonormal columns spanning centred ones, so each sums to 0
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (u * np.sqrt(spectrum * (n - 1))) @ rotation.T + 3.0


def _extract(path, dtype):
    model = nm.load("induction-2l")
    tokens = torch.randint(0, model.module.config.vocab_size, (12, 16), generator=torch.Generator().manual_seed(0))
    return nm.extract(model, tokens, "blocks.1.hook_resid_post", path, dtype=dtype, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _extract(tmp_path_factory.mktemp("store") / "s.h5", torch.float32)


@pytest.mark.parametrize("shape", [(300, 12), (15, 40)])  # more rows than features (covariance), fewer (SVD)
def test_pca_equals_sklearn(shape):
    from sklearn.decomposition import PCA

    x = _data(*shape)
    k = 4
    ours = pca(x, n_components=k)
    theirs = PCA(n_components=k).fit(x)
    signs = np.sign((ours.components.numpy() * theirs.components_).sum(1))
    np.testing.assert_allclose(ours.components.numpy() * signs[:, None], theirs.components_, atol=1e-10)
    np.testing.assert_allclose(ours.coordinates.numpy() * signs, theirs.transform(x), atol=1e-9)
    np.testing.assert_allclose(ours.explained_variance_ratio[:k].numpy(), theirs.explained_variance_ratio_,
                               atol=1e-12)
    every = PCA().fit(x).explained_variance_ratio_  # the full spectrum, as many as min(rows, features)
    np.testing.assert_allclose(ours.explained_variance_ratio.numpy(), every, atol=1e-12)
    np.testing.assert_allclose(ours.transform(x[:5]).numpy() * signs, theirs.transform(x[:5]), atol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 10_000])
def test_pca_streams_a_store_like_the_matrix_in_memory(store, batch_size):
    hook = "blocks.1.hook_resid_post"
    whole = store[hook][:].double().numpy()
    in_memory = pca(whole, n_components=3)
    exact = torch.float64  # the store holds float32: by default its products would be float32 too
    for streamed in (pca(store, hook, n_components=3, batch_size=batch_size, dtype=exact),
                     pca(store[hook], n_components=3, batch_size=batch_size, dtype=exact)):
        np.testing.assert_allclose(streamed.coordinates.numpy(), in_memory.coordinates.numpy(), atol=1e-8)
        np.testing.assert_allclose(streamed.components.numpy(), in_memory.components.numpy(), atol=1e-8)
        np.testing.assert_allclose(streamed.explained_variance_ratio.numpy(),
                                   in_memory.explained_variance_ratio.numpy(), atol=1e-12)
        np.testing.assert_allclose(streamed.mean.numpy(), whole.mean(0), atol=1e-10)
    dims = effective_dimensionality(store, hook, batch_size=batch_size, dtype=exact)
    assert dims["participation_ratio"] == pytest.approx(in_memory.participation_ratio, rel=1e-9)
    assert (dims["dims_95"], dims["dims_99"]) == (in_memory.dimensions_for(0.95), in_memory.dimensions_for(0.99))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pca_streams_half_precision_stores(tmp_path, dtype):
    hook = "blocks.1.hook_resid_post"
    half = _extract(tmp_path / "h.h5", dtype)
    in_memory = pca(half[hook][:].double().numpy(), n_components=2)
    streamed = pca(half, hook, n_components=2, batch_size=50, dtype=torch.float64)
    np.testing.assert_allclose(streamed.coordinates.numpy(), in_memory.coordinates.numpy(), atol=1e-8)
    np.testing.assert_allclose(streamed.explained_variance_ratio.numpy(), in_memory.explained_variance_ratio.numpy(),
                               atol=1e-12)


def test_float32_products_agree_with_float64_to_single_precision(store):
    hook = "blocks.1.hook_resid_post"
    exact = pca(store, hook, n_components=3, dtype=torch.float64)
    default = pca(store, hook, n_components=3, batch_size=64)  # a float32 store: float32 products by default
    assert torch.equal(default.coordinates, pca(store, hook, n_components=3, batch_size=64,
                                                dtype=torch.float32).coordinates)
    assert not torch.equal(default.coordinates, exact.coordinates)
    scale = float(exact.coordinates.abs().max())
    for source in (store, store[hook][:]):
        single = pca(source, hook if source is store else None, n_components=3, batch_size=64, dtype=torch.float32)
        assert single.coordinates.dtype == torch.float64
        np.testing.assert_allclose(single.coordinates.numpy(), exact.coordinates.numpy(), atol=1e-4 * scale)
        np.testing.assert_allclose(single.explained_variance_ratio.numpy(), exact.explained_variance_ratio.numpy(),
                                   atol=1e-6)
    with pytest.raises(nm.InputError, match="dtype must be torch.float32, torch.float64 or None"):
        pca(store, hook, dtype=torch.float16)


def test_a_store_view_with_nan_is_refused_naming_the_count(tmp_path):
    import h5py

    from neuronmap.store.reader import HookView

    values = _data(100, 4).astype(np.float32)
    values[[61, 70], 2] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as file:
        view = HookView(file.create_dataset("x", data=values), 100, "x")
        with pytest.raises(nm.InputError, match="rows 50 to 100 of 'x' hold 2 NaN or infinite values"):
            pca(view, batch_size=50)
        with pytest.raises(nm.InputError, match="2 NaN"):
            effective_dimensionality(view, batch_size=50)


def test_a_store_gives_each_row_its_token_in_context_and_escapes_it(store):
    projection = pca(store, "blocks.1.hook_resid_post")
    contexts = nm.analysis.activations.token_contexts(store)
    assert list(projection.hover) == list(contexts) and len(contexts) == len(store)
    page = projection._repr_html_()
    assert "showing" not in page  # 192 rows: all drawn
    assert page.count("<circle") >= len(store)


def test_effective_dimensionality_of_a_planted_spectrum():
    spectrum = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625])
    x = _planted(spectrum)
    found = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    np.testing.assert_allclose(found, spectrum, atol=1e-9)  # the data hold the planted spectrum
    share = np.cumsum(spectrum) / spectrum.sum()
    by_hand = {"participation_ratio": spectrum.sum() ** 2 / (spectrum**2).sum(),
               "dims_95": int(np.argmax(share >= 0.95)) + 1, "dims_99": int(np.argmax(share >= 0.99)) + 1}
    assert (by_hand["dims_95"], by_hand["dims_99"]) == (5, 7)
    dims = effective_dimensionality(x)
    assert dims["participation_ratio"] == pytest.approx(by_hand["participation_ratio"], rel=1e-10)
    assert (dims["dims_95"], dims["dims_99"]) == (by_hand["dims_95"], by_hand["dims_99"])
    projection = pca(x)
    assert projection.participation_ratio == pytest.approx(by_hand["participation_ratio"], rel=1e-10)
    assert projection.dimensions_for(0.95) == 5 and projection.dimensions_for(0.99) == 7
    assert projection.dimensions_for(1.0) == 8


def test_tsne_equals_sklearn_with_the_same_seed():
    from sklearn.manifold import TSNE

    x = _data(120, 8, seed=3)
    ours = tsne(x, perplexity=10, seed=4)
    theirs = TSNE(n_components=2, perplexity=10, random_state=4, init="pca", learning_rate="auto").fit_transform(x)
    np.testing.assert_allclose(ours.coordinates.numpy(), theirs, rtol=1e-6, atol=1e-6)
    assert ours.method == "t-SNE" and ours.components is None


def test_tsne_first_reduces_wide_rows_to_principal_components():
    from sklearn.manifold import TSNE

    x = _data(80, 30, seed=5)
    reduced = pca(x, n_components=6).coordinates.numpy()
    theirs = TSNE(n_components=2, perplexity=8, random_state=0, init="pca", learning_rate="auto").fit_transform(reduced)
    np.testing.assert_allclose(tsne(x, perplexity=8, pca_components=6).coordinates.numpy(), theirs, atol=1e-6)


def test_views_escape_labels_and_cover_the_whole_spectrum():
    x = _data(60, 5)
    labels = ["<script>alert(1)</script>" if i % 2 else "plain" for i in range(60)]
    projection = pca(x, labels=labels)
    page = projection._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "explained variance by component" in page and "participation ratio" in page
    assert repr(projection).startswith("Projection(PCA, 60 rows → 2 dims")
    figure = pca(x, n_components=3).figure()
    assert figure.data[0].type == "scatter3d"
    curve = projection.variance_figure()
    np.testing.assert_allclose(curve.data[1].y, np.cumsum(projection.explained_variance_ratio.numpy()))
    assert projection.to_numpy().shape == (60, 2)
    line = pca(x, n_components=1)  # one coordinate is drawn against 0
    assert line._repr_html_().count("<circle") >= 60 and list(line.figure().data[0].y) == [0.0] * 60


def test_bad_input_is_named():
    x = _data(20, 5)
    with pytest.raises(nm.InputError, match="19 labels for 20 rows of activations"):
        pca(x, labels=[0] * 19)
    with pytest.raises(nm.InputError, match="n_components=6 is more than"):
        pca(x, n_components=6)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(nm.InputError, match="1 NaN"):
        pca(bad)
    with pytest.raises(nm.InputError, match="perplexity"):
        tsne(x, perplexity=30)
    with pytest.raises(nm.InputError, match="needs a PCA projection"):
        tsne(x, perplexity=5).dimensions_for(0.95)
    with pytest.raises(nm.InputError, match="features"):
        pca(x).transform(x[:, :4])
    with pytest.raises(nm.InputError, match="at least 2 rows"):
        pca(x[:1], n_components=1)


def test_umap_without_umap_learn_says_how_to_install_it():
    if importlib.util.find_spec("umap") is None:  # umap-learn is an optional extra, not in the dev environment
        with pytest.raises(nm.InputError, match=r'pip install "neuronmap\[umap\]"'):
            umap(_data(30, 4))
    else:
        assert umap(_data(30, 4), n_neighbors=5).coordinates.shape == (30, 2)
