"""How alike two sets of activations of the same inputs are: CKA, RSA, CCA / SVCCA / PWCCA and Procrustes distance.

Every measure takes two activation sets with one row per input (a tensor or array, a store, or a `(trace or store,
hook)` pair; see `as_matrix`) and returns a number (or, for `cca`, the canonical correlations). `similarity_matrix`
scores every pair of a list of sets (every layer, or two models' layers) as a `SimilarityMatrix` heatmap. scipy
supplies the distances (`pdist`), rank correlations and the Procrustes rotation; written here are what it lacks: the
CKA estimators (biased, debiased and minibatch HSIC), Kendall's τ_a, the RSA permutation test, and SVCCA / PWCCA.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import HookNameError, InputError
from ..trace import Trace
from .activations import as_matrix, product_dtype
from .similarity_view import SimilarityMatrix

KERNELS = ("linear", "rbf")
RDM_METRICS = ("correlation", "cosine", "euclidean")
RSA_COMPARISONS = ("spearman", "kendall")


# ---------------------------------------------------------------- CKA


def cka(x: Any, y: Any, *, kernel: str = "linear", debiased: bool = False, sigma: float | None = None,
        dtype: torch.dtype | None = None) -> float:
    """Centred kernel alignment of two activation sets of the same inputs (Kornblith et al. 2019): 1 for sets equal
    up to a rotation and a scale, near 0 for unrelated ones.

    `kernel="linear"` is computed from `[features × features]` products when that is cheaper than the `[n × n]`
    Gram matrices (many inputs, few features); `"rbf"` uses `exp(-|a - b|² / 2σ²)` with `sigma` (default: the
    median distance between distinct rows of each set). `debiased` uses the unbiased HSIC estimator of Song et al.
    (2012), as Nguyen et al. (2021) do, which needs at least 4 rows and removes the bias towards 1 of few inputs.
    `dtype`: the precision of the feature-space products (`product_dtype`: by default the data's own, float32 for
    float32 activations, with means and sums in float64).
    """
    _choice(kernel, KERNELS, "kernel")
    if sigma is not None and kernel != "rbf":
        raise InputError(f"sigma is the RBF kernel's bandwidth: pass kernel='rbf' with it (kernel is {kernel!r})")
    products = product_dtype(dtype, [(x, None), (y, None)])
    x, y = _pair(x, y, minimum=4 if debiased else 2, why="the debiased estimator" if debiased else "CKA")
    if kernel == "linear":
        x, y = x - x.mean(0), y - y.mean(0)
        if _feature_space(x, y):
            return _feature_cka(x, y, debiased, products)
        k, l = x @ x.T, y @ y.T
    else:
        k, l = _rbf_gram(x, sigma), _rbf_gram(y, sigma)
    hsic = _unbiased_hsic if debiased else _biased_hsic
    return _ratio(hsic(k, l), hsic(k, k), hsic(l, l))


def minibatch_cka(x: Any, y: Any, *, store: Any = None, batch_size: int = 1024) -> float:
    """Linear CKA accumulated over minibatches of rows (Nguyen et al. 2021): the mean unbiased HSIC of the batches,
    so memory holds one batch, not the whole set.

    `x`, `y`: two activation sets (a store's hook views, `store[hook]`, are read block by block), or, with `store=`
    an activation store, two of its hook names, streamed together in order (`store.batches(..., shuffle=False)`).
    A batch (the last one) of fewer than 4 rows is left out. With one batch of every row it equals
    `cka(x, y, debiased=True)`; over batches it converges to it as they grow.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 4:
        raise InputError(f"batch_size must be an int of at least 4 (unbiased HSIC needs 4 rows), got {batch_size!r}")
    if store is not None:
        for hook in (x, y):
            if not isinstance(hook, str):
                raise InputError(f"with store=, x and y are hook names of the store, got a {type(hook).__name__}")
        hooks = [x] if x == y else [x, y]
        batches = (
            (batch[x], batch[y])
            for batch in store.batches(hooks, batch_size, shuffle=False, epochs=1)
        )
        batches = ((as_matrix(a.flatten(1)), as_matrix(b.flatten(1))) for a, b in batches)
    else:
        if isinstance(x, str) or isinstance(y, str):
            raise InputError("x and y are hook names: pass the activation store they come from as store=")
        batches = _row_blocks(x, y, batch_size)
    totals = torch.zeros(3, dtype=torch.float64)
    count = 0
    for a, b in batches:
        if len(a) < 4:
            continue
        a, b = a - a.mean(0), b - b.mean(0)
        hsics = [_feature_hsic(a, b, True), _feature_hsic(a, a, True), _feature_hsic(b, b, True)]
        totals += torch.tensor(hsics, dtype=torch.float64)
        count += 1
    if count == 0:
        raise InputError("minibatch CKA needs at least one batch of 4 or more rows")
    return _ratio(*(totals / count).tolist())


def _row_blocks(x: Any, y: Any, batch_size: int):
    """Consecutive blocks of `batch_size` rows of both sets: read from disk block by block for a store's hook view,
    sliced from the whole matrix for anything else."""
    readers, lengths = [], []
    for source in (x, y):
        if isinstance(source, tuple) or not (hasattr(source, "read") and hasattr(source, "to_torch")):
            matrix = _matrix(source)
            readers.append(lambda i, j, matrix=matrix: matrix[i:j])
            lengths.append(len(matrix))
        else:
            readers.append(lambda i, j, view=source: as_matrix(view.to_torch(view.read(i, j)).flatten(1)))
            lengths.append(len(source))
    if lengths[0] != lengths[1]:
        raise InputError(
            f"x has {lengths[0]:,} rows (samples) and y {lengths[1]:,}: compare activations of the same inputs"
        )
    for start in range(0, lengths[0], batch_size):
        yield readers[0](start, start + batch_size), readers[1](start, start + batch_size)


def _feature_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool, products: torch.dtype) -> float:
    """Linear CKA of column-centred float64 `x`, `y` from feature-space products in `products` precision:
    `|yᵀx|² / (|xᵀx| |yᵀy|)` (Frobenius); the debiased estimator's row terms stay float64."""
    (a, a_terms, aa), (b, b_terms, bb) = _feature_prepared(x, debiased, products), _feature_prepared(y, debiased, products)
    return _ratio(_feature_hsic(a, b, debiased, a_terms, b_terms), aa, bb)


def _feature_prepared(c: torch.Tensor, debiased: bool, products: torch.dtype):
    """A centred set cast to `products`, its row terms (debiased only, from float64) and its own HSIC."""
    terms = _row_terms(c) if debiased else None
    cast = c.to(products)
    return cast, terms, _feature_hsic(cast, cast, debiased, terms, terms)


def _feature_hsic(x: torch.Tensor, y: torch.Tensor, debiased: bool, x_terms: tuple | None = None,
                  y_terms: tuple | None = None) -> float:
    """HSIC of the linear kernels `xxᵀ`, `yyᵀ` of centred `x`, `y` (up to a factor common to a CKA ratio), without
    forming them; the unbiased estimator's diagonal and row-sum terms come from the rows' norms and sums
    (`_row_terms`, passed in when already known)."""
    cross = float((y.T @ x).double().square().sum())  # <K, L>_F
    if not debiased:
        return cross
    (kd, k1), (ld, l1) = x_terms or _row_terms(x), y_terms or _row_terms(y)
    trace = cross - float(kd @ ld)
    return _unbiased_terms(trace, float(k1.sum()), float(l1.sum()), float(k1 @ l1), x.shape[0])


def _row_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`diag(K)` and `K̃1` (the row sums of `K = xxᵀ` with its diagonal zeroed) of a centred `x`."""
    kd = x.square().sum(1)
    return kd, x @ x.sum(0) - kd


def _biased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """`tr(KHLH)` (the biased HSIC up to 1/(n-1)², which CKA's ratio cancels)."""
    return float((_centred(k) * _centred(l)).sum())


def _unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """The unbiased HSIC estimator of Song et al. (2012) of two `[n × n]` kernel matrices."""
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    k1, l1 = k.sum(1), l.sum(1)
    return _unbiased_terms(float((k * l).sum()), float(k1.sum()), float(l1.sum()), float(k1 @ l1), k.shape[0])


def _unbiased_terms(trace: float, k_sum: float, l_sum: float, k1_l1: float, n: int) -> float:
    """`[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))` from its parts."""
    return (trace + k_sum * l_sum / ((n - 1) * (n - 2)) - 2 * k1_l1 / (n - 2)) / (n * (n - 3))


def _centred(k: torch.Tensor) -> torch.Tensor:
    """`HKH`: a kernel matrix with its row and column means removed."""
    k = k - k.mean(0, keepdim=True)
    return k - k.mean(1, keepdim=True)


def _rbf_gram(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """`exp(-|a - b|² / 2σ²)` for every pair of rows; σ defaults to the median distance of distinct rows."""
    import scipy.spatial.distance
    squared = torch.cdist(x, x).square()
    if sigma is None:
        sigma = float(np.median(scipy.spatial.distance.pdist(x.numpy())))
        if sigma == 0:
            raise InputError("the RBF kernel's median distance is 0 (most rows are equal): pass sigma=")
    elif not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma!r}")
    return torch.exp(-squared / (2 * sigma * sigma))


def _ratio(xy: float, xx: float, yy: float) -> float:
    """`xy / sqrt(xx·yy)`; an error when a set has no variation (the ratio is undefined)."""
    if not xx > 0 or not yy > 0:
        raise InputError("an activation set is constant over its rows (no variation to compare)")
    return xy / math.sqrt(xx * yy)


# ---------------------------------------------------------------- RSA


class RSAResult(NamedTuple):
    """The rank correlation of two RDMs and its one-sided permutation p-value (NaN without permutations)."""

    correlation: float
    p_value: float
    permutations: int


def rdm(x: Any, metric: str = "correlation", *, square: bool = False) -> torch.Tensor:
    """The representational dissimilarity matrix of an activation set: `metric` distance between every pair of rows
    (scipy's `pdist`), condensed (upper triangle, row by row) or `square`."""
    import scipy.spatial.distance
    _choice(metric, RDM_METRICS, "metric")
    matrix = _matrix(x)
    if len(matrix) < 3:
        raise InputError(f"an RDM for RSA needs at least 3 rows (inputs), got {len(matrix)}")
    distances = scipy.spatial.distance.pdist(matrix.numpy(), metric)
    bad = int((~np.isfinite(distances)).sum())
    if bad:
        raise InputError(f"{bad:,} {metric} distances are undefined (rows with no variation or of norm 0)")
    return torch.from_numpy(scipy.spatial.distance.squareform(distances) if square else distances)


def rsa(
    x: Any,
    y: Any,
    *,
    metric: str = "correlation",
    compare: str = "spearman",
    permutations: int = 1000,
    seed: int = 0,
) -> RSAResult:
    """Representational similarity analysis: the rank correlation (Spearman's ρ or Kendall's τ_a) of the two sets'
    RDMs, and the permutation p-value of it: the share of `permutations` joint row-and-column shuffles of `y`'s RDM
    (inputs relabelled) that correlate at least as well, counting the observed one (`(1 + hits) / (1 + permutations)`).
    """
    import scipy.spatial.distance
    import scipy.stats
    _choice(compare, RSA_COMPARISONS, "compare")
    if not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 0:
        raise InputError(f"permutations must be an int >= 0, got {permutations!r}")
    x, y = _pair(x, y, minimum=3, why="RSA")
    a, b = rdm(x, metric).numpy(), rdm(y, metric).numpy()
    for name, distances in (("x", a), ("y", b)):
        if np.ptp(distances) == 0:
            raise InputError(f"the RDM of {name} is constant: every pair of rows is equally far apart")
    correlate = _spearman if compare == "spearman" else _kendall_tau_a
    observed = correlate(a, b)
    if permutations == 0:
        return RSAResult(observed, float("nan"), 0)
    n = len(x)
    rows, columns = np.triu_indices(n, 1)
    spearman = compare == "spearman"  # ranks of a shuffled RDM are the shuffled ranks: shuffle the ranks once found
    square = scipy.spatial.distance.squareform(scipy.stats.rankdata(b) if spearman else b)
    a_ranks = scipy.stats.rankdata(a)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, 64):
        orders = np.stack([rng.permutation(n) for _ in range(min(64, permutations - start))])
        shuffled = square[orders[:, rows], orders[:, columns]]  # [permutations, pairs]
        if spearman:
            scores = _pearson_rows(a_ranks, shuffled)
        else:
            scores = np.array([_kendall_tau_a(a, row) for row in shuffled])
        hits += int((scores >= observed - 1e-12).sum())
    return RSAResult(observed, (1 + hits) / (1 + permutations), permutations)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    import scipy.stats
    return float(_pearson_rows(scipy.stats.rankdata(a), scipy.stats.rankdata(b)[None])[0])


def _pearson_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Pearson's r of `a` with each row of `rows`."""
    a = a - a.mean()
    rows = rows - rows.mean(1, keepdims=True)
    return rows @ a / np.sqrt((a @ a) * (rows * rows).sum(1))


def _kendall_tau_a(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ_a, `(concordant - discordant) / (m(m-1)/2)` over all pairs (ties count as neither), from scipy's
    τ_b (`(C - D) / sqrt((n0 - n1)(n0 - n2))`) and the tie counts n1, n2 of each vector."""
    import scipy.stats
    m = len(a)
    pairs = m * (m - 1) / 2
    tau_b = scipy.stats.kendalltau(a, b).statistic
    tied = [sum(t * (t - 1) / 2 for t in np.unique(v, return_counts=True)[1]) for v in (a, b)]
    return float(tau_b * math.sqrt((pairs - tied[0]) * (pairs - tied[1])) / pairs)


# ---------------------------------------------------------------- CCA family


def cca(x: Any, y: Any) -> torch.Tensor:
    """The canonical correlations of two activation sets, largest first: the singular values of `QxᵀQy`, where
    `Qx`, `Qy` are orthonormal bases of the centred sets' column spaces. With fewer rows than the two sets' ranks
    together, some are 1 by construction; use many more inputs than features (or `svcca`)."""
    x, y = _pair(x, y, minimum=2, why="CCA")
    return _canonical(_basis(x - x.mean(0)), _basis(y - y.mean(0)))[1]


def svcca(x: Any, y: Any, *, keep: float | int = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): the mean canonical correlation after reducing each set to its top singular
    directions: those explaining a `keep` fraction of its variance (a float in (0, 1]) or `keep` of them (an int)."""
    x, y = _pair(x, y, minimum=2, why="SVCCA")
    return float(_canonical(*(_basis(_reduced(m - m.mean(0), keep)) for m in (x, y)))[1].mean())


def pwcca(x: Any, y: Any) -> float:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations averaged with weights `α_i ∝ Σ_j
    |⟨h_i, x_j⟩|`, how much of `x`'s neurons `x_j` (centred columns) each canonical variate `h_i` of `x` accounts for.
    Asymmetric: the weights come from `x`."""
    x, y = _pair(x, y, minimum=2, why="PWCCA")
    x = x - x.mean(0)
    qx = _basis(x)
    variates, correlations = _canonical(qx, _basis(y - y.mean(0)))
    weights = (variates.T @ x).abs().sum(1)
    return float((weights / weights.sum()) @ correlations)


def procrustes(x: Any, y: Any) -> float:
    """Orthogonal Procrustes distance: `min_R |xR - y|_F` over rotations `R` (scipy) after centring each set and
    scaling it to Frobenius norm 1 (the smaller set padded with zero features): 0 for a rotated and scaled copy,
    at most 2. Its square equals `2 - 2|xᵀy|_*` (Ding et al. 2021)."""
    import scipy.linalg
    x, y = _pair(x, y, minimum=2, why="Procrustes")
    x, y = (_unit(m - m.mean(0)) for m in (x, y))
    width = max(x.shape[1], y.shape[1])
    x, y = (torch.nn.functional.pad(m, (0, width - m.shape[1])).numpy() for m in (x, y))
    rotation, _ = scipy.linalg.orthogonal_procrustes(x, y)
    return float(np.linalg.norm(x @ rotation - y))


def _basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis `[n, rank]` of the column space of `x` (directions of singular value above round-off)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if len(s) == 0 or s[0] == 0:
        raise InputError("an activation set is constant over its rows (no variation to compare)")
    return u[:, s > s[0] * max(x.shape) * torch.finfo(x.dtype).eps]


def _canonical(qx: torch.Tensor, qy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical variates of the `x` side (`[n, k]`, orthonormal) and the canonical correlations (`[k]`)."""
    u, s, _ = torch.linalg.svd(qx.T @ qy, full_matrices=False)
    return qx @ u, s.clamp(0, 1)


def _reduced(x: torch.Tensor, keep: float | int) -> torch.Tensor:
    """`x` projected onto its top singular directions (`u_k s_k`), by variance fraction or count."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise InputError(f"keep must be a variance fraction in (0, 1] or a number of dimensions, got {keep!r}")
    if isinstance(keep, int):
        if keep < 1:
            raise InputError(f"keep must keep at least 1 dimension, got {keep}")
        k = min(keep, len(s))
    else:
        if not 0 < keep <= 1:
            raise InputError(f"keep as a variance fraction must be in (0, 1], got {keep}")
        explained = (s.square().cumsum(0) / s.square().sum()).tolist()
        k = next((i + 1 for i, share in enumerate(explained) if share >= keep - 1e-12), len(s))
    return u[:, :k] * s[:k]


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(x)
    if norm == 0:
        raise InputError("an activation set is constant over its rows (no variation to compare)")
    return x / norm


# ---------------------------------------------------------------- every pair


METHODS: dict[str, Callable[..., float]] = {
    "cka": cka,
    "rsa": lambda x, y, **options: rsa(x, y, **{"permutations": 0, **options}).correlation,
    "cca": lambda x, y: float(cca(x, y).mean()),
    "svcca": svcca,
    "pwcca": pwcca,
    "procrustes": procrustes,
}
"""What `similarity_matrix` computes for each `method` (`"rsa"`: the correlation, no permutation test;
`"cca"`: the mean canonical correlation). Options pass through to the function."""


def similarity_matrix(
    sources: Sequence[Any] | Mapping[str, Any],
    others: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    method: str = "cka",
    names: Sequence[str] | None = None,
    other_names: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> SimilarityMatrix:
    """`method` between every pair of activation sets (of the same inputs): of `sources` with itself, or rows
    `sources` × columns `others` (two models' layers). A mapping's keys name its sets; otherwise `names` do (default
    their positions). `options` go to the method (e.g. `kernel="rbf"`, `debiased=True` for CKA). `dtype`: the
    precision of linear CKA's feature-space products, by default the data's own (see `cka`)."""
    _choice(method, tuple(METHODS), "method")
    every_set = [*(sources.values() if isinstance(sources, Mapping) else sources)]
    every_set += [*(others.values() if isinstance(others, Mapping) else others)] if others is not None else []
    products = product_dtype(dtype, [(s, None) for s in every_set])
    rows, row_names = _named(sources, names, "sources")
    columns, column_names = (rows, row_names) if others is None else _named(others, other_names, "others")
    for matrix, name in zip(rows + columns, row_names + column_names):
        _same_rows(rows[0], matrix, row_names[0], name)
    measure = _pairwise(method, rows, columns, options, products)
    symmetric = others is None and method != "pwcca"
    values = torch.full((len(rows), len(columns)), float("nan"), dtype=torch.float64)
    for i in range(len(rows)):
        for j in range(len(columns)):
            values[i, j] = values[j, i] if symmetric and j < i else measure(i, j)
    label = method + "".join(f", {key}={value}" for key, value in options.items())
    return SimilarityMatrix(values, row_names, column_names, label)


def _pairwise(method: str, rows: list[torch.Tensor], columns: list[torch.Tensor], options: dict[str, Any],
              products: torch.dtype):
    """`method` of `rows[i]` and `columns[j]` as a function of `(i, j)`. Linear CKA centres each set and computes its
    own HSIC once, leaving one product a pair of different sets: `yᵀx` in feature space (more rows than features),
    else the inner product of two prepared `[n × n]` Gram matrices (there at most about 1.5 times a set's size)."""
    measure = METHODS[method]
    linear = method == "cka" and options.get("kernel", "linear") == "linear" and set(options) <= {"kernel", "debiased"}
    if not linear:
        return lambda i, j: measure(rows[i], columns[j], **options)
    debiased = bool(options.get("debiased", False))
    if len(rows[0]) < (4 if debiased else 2):
        raise InputError(f"CKA needs at least {4 if debiased else 2} rows (samples), got {len(rows[0])}")
    if all(_feature_space(a, b) for a in rows for b in columns):
        def prepare(m: torch.Tensor):
            cast, terms, own = _feature_prepared(m - m.mean(0), debiased, products)
            return (cast, terms), own

        def hsic(x, y) -> float:
            return _feature_hsic(x[0], y[0], debiased, x[1], y[1])
    else:
        prepare = _gram_prepared if not debiased else _unbiased_gram_prepared
        hsic = _gram_hsic if not debiased else _unbiased_gram_hsic
    rows_prepared = [prepare(m) for m in rows]
    columns_prepared = rows_prepared if columns is rows else [prepare(m) for m in columns]

    def pair(i: int, j: int) -> float:
        (x, xx), (y, yy) = rows_prepared[i], columns_prepared[j]
        if i == j and columns_prepared is rows_prepared:  # a set with itself: its own HSIC, already known
            return _ratio(xx, xx, yy)
        return _ratio(hsic(x, y), xx, yy)

    return pair


def _gram_prepared(m: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The centred linear Gram matrix `HKH` (`xxᵀ` of the centred set) and its own biased HSIC."""
    c = m - m.mean(0)
    k = c @ c.T
    return k, _gram_hsic(k, k)


def _gram_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    return float(torch.dot(k.flatten(), l.flatten()))


def _unbiased_gram_prepared(m: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, int], float]:
    """`K̃` (the centred set's linear Gram matrix, diagonal zeroed), its row sums, and its own unbiased HSIC."""
    c = m - m.mean(0)
    k = (c @ c.T).fill_diagonal_(0)
    prepared = (k, k.sum(1), len(k))
    return prepared, _unbiased_gram_hsic(prepared, prepared)


def _unbiased_gram_hsic(a: tuple[torch.Tensor, torch.Tensor, int], b: tuple[torch.Tensor, torch.Tensor, int]) -> float:
    (k, k1, n), (l, l1, _) = a, b
    trace = float(torch.dot(k.flatten(), l.flatten()))
    return _unbiased_terms(trace, float(k1.sum()), float(l1.sum()), float(k1 @ l1), n)


def _feature_space(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether linear CKA of `x`, `y` is cheaper from feature-space products than from `[n × n]` Gram matrices."""
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    return n * (dx * dy + dx * dx + dy * dy) < n * n * (dx + dy)


def layer_similarity(
    source: Any, hooks: str | Sequence[str], *, method: str = "cka", **options: Any
) -> SimilarityMatrix:
    """`similarity_matrix` of the hook points of a `Trace` or activation store matching `hooks` (names or glob
    patterns such as `"blocks.*.hook_resid_post"`), in the source's order. A store is read whole (see
    `minibatch_cka` for a streamed pair). `options` as for `similarity_matrix`."""
    available = list(source.keys()) if isinstance(source, Trace) else list(getattr(source, "hooks", []))
    if not available:
        raise InputError(f"layer_similarity reads a Trace or an activation store, not a {type(source).__name__}")
    chosen = _matching(available, [hooks] if isinstance(hooks, str) else list(hooks))
    if len(chosen) < 2:
        raise InputError(f"layer_similarity needs at least 2 hook points, {hooks!r} matches {chosen}")
    return similarity_matrix({hook: (source, hook) for hook in chosen}, method=method, **options)


def _matching(available: list[str], wanted: list[str]) -> list[str]:
    found: set[str] = set()
    for name in wanted:
        matches = fnmatch.filter(available, name) if any(ch in name for ch in "*?[") else [name] * (name in available)
        if not matches:
            raise HookNameError(name, available, pattern=any(ch in name for ch in "*?["))
        found.update(matches)
    return [name for name in available if name in found]


def _named(sets: Sequence[Any] | Mapping[str, Any], names: Sequence[str] | None, what: str):
    """The sets as matrices and their labels."""
    if isinstance(sets, Mapping):
        names, sets = list(sets.keys()) if names is None else names, list(sets.values())
    sets = list(sets)
    if not sets:
        raise InputError(f"{what} holds no activation sets")
    names = [str(i) for i in range(len(sets))] if names is None else [str(name) for name in names]
    if len(names) != len(sets):
        raise InputError(f"{len(names)} names for {len(sets)} activation sets in {what}")
    return [_matrix(s) for s in sets], names


def _same_rows(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise InputError(f"{a_name!r} has {len(a):,} rows and {b_name!r} {len(b):,}: compare sets of the same inputs")


def _pair(x: Any, y: Any, *, minimum: int, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as `[samples, features]` float64 matrices of the same number (at least `minimum`) of rows."""
    x, y = _matrix(x), _matrix(y)
    if len(x) != len(y):
        raise InputError(f"x has {len(x):,} rows (samples) and y {len(y):,}: compare activations of the same inputs")
    if len(x) < minimum:
        raise InputError(f"{why} needs at least {minimum} rows (samples), got {len(x)}")
    return x, y


def _matrix(source: Any) -> torch.Tensor:
    """`as_matrix` of an activation set, or of a `(trace or store, hook)` pair."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], str):
        return as_matrix(*source)
    return as_matrix(source)


def _choice(value: Any, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise InputError(f"unknown {what} {value!r}: choose one of {', '.join(map(repr, valid))}")
