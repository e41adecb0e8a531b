"""Linear probes: how well a layer's activations predict a label, cross-validated, against a control task.

`probe` fits a logistic (classes) or ridge (numbers) probe on standardised activations with k-fold cross-validation
(stratified for classes) and, by default, the control task of Hewitt & Liang (2019): every token type gets a random
label drawn from the labels' own distribution, the same probe learns that, and selectivity = accuracy − control
accuracy says how much of the accuracy the probe could not have reached by memorising token types. `probe_by_layer`
runs one probe per hook point (`ProbeCurve`). scikit-learn supplies the models, scaling and fold splitters; the
control task and the per-layer curve are written here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..trace import Trace
from .activations import as_matrix, row_tokens
from .probe_view import ProbeCurve, ProbeResult
from .streaming import labels_array

KINDS = ("logistic", "ridge")


def probe(
    source: Any,
    labels: Any,
    hook: str | None = None,
    *,
    kind: str = "logistic",
    folds: int = 5,
    control: bool = True,
    token_types: Any = None,
    seed: int = 0,
    regularization: float = 1.0,
) -> ProbeResult:
    """A linear probe from the activations of `source` at `hook` (see `as_matrix`) to `labels`, one per row.

    `kind="logistic"`: labels are classes (any values), scored by accuracy over `folds` stratified folds;
    `"ridge"`: labels are numbers, scored by R². Features are standardised inside each fold; `regularization` is
    the penalty's strength (logistic `C = 1 / regularization`, ridge `alpha = regularization`). With `control`, the
    control task gives each token type (the token id of each row: from a trace's tokens, a store's `.tokens`, or
    `token_types=`) one random label drawn from the labels' empirical distribution and is scored with the same
    folds (rows that all share one token type, such as every prompt's last token, make it constant and trivially
    learnt: pass `control=False` there). `.direction` is the probe refitted on every row, in the activations' units.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, not {kind!r}")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise InputError(f"folds must be an int of at least 2, got {folds!r}")
    if not regularization > 0:
        raise InputError(f"regularization must be positive, got {regularization!r}")
    x = as_matrix(source, hook).numpy()
    y, classes = _labels(labels, len(x), kind, folds)
    splits = _splits(x, y, kind, folds, seed)
    fold_scores = _cross_validate(x, y, splits, kind, regularization)
    control_scores = None
    if control:
        types = _token_types(source, hook, token_types, len(x))
        control_labels = control_task(y, types, seed=seed)
        control_scores = _cross_validate(x, control_labels, splits, kind, regularization)
    fitted = make_probe(kind, regularization).fit(x, y)
    return ProbeResult(
        fold_scores, control_scores, fitted, kind=kind, classes=classes, baseline=_baseline(y, kind), hook=hook,
        rows=len(x), regularization=regularization,
    )


def probe_by_layer(
    source: Any, labels: Any, hooks: str | Sequence[str] = "blocks.*.hook_resid_post", **options: Any
) -> ProbeCurve:
    """`probe` at every hook point of `source` matching `hooks` (names or glob patterns), in the source's order.

    `source`: a `Trace`, an activation store, or a mapping of names to activations (tensors or arrays). `options`
    are `probe`'s (the same folds and control labels at every layer, so the curves compare like with like).
    """
    names = _hook_names(source, hooks)
    if isinstance(source, Mapping):
        results = [probe(source[name], labels, **options) for name in names]
    else:
        results = [probe(source, labels, name, **options) for name in names]
    for name, result in zip(names, results):
        result.hook = name
    return ProbeCurve(names, results)


def control_task(labels: Any, token_types: Any, *, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang's control labels: each distinct token type gets one label drawn (with replacement) from
    `labels` themselves, so from their empirical distribution, and every row takes its type's label."""
    labels, types = np.asarray(labels), np.asarray(token_types)
    if len(labels) != len(types):
        raise InputError(f"{len(types):,} token types for {len(labels):,} labels: give one type per row")
    distinct, row_type = np.unique(types, return_inverse=True)
    drawn = labels[np.random.default_rng(seed).integers(0, len(labels), size=len(distinct))]
    return drawn[row_type.reshape(-1)]


def make_probe(kind: str, regularization: float = 1.0) -> Any:
    """The unfitted scikit-learn probe: standardisation, then logistic regression (`C = 1 / regularization`) or
    ridge regression (`alpha = regularization`)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / regularization, max_iter=2000))
    return make_pipeline(StandardScaler(), Ridge(alpha=regularization))


def splitter(kind: str, folds: int, seed: int) -> Any:
    """The fold splitter `probe` uses: `StratifiedKFold` for classes, `KFold` for numbers, shuffled by `seed`."""
    from sklearn.model_selection import KFold, StratifiedKFold

    cls = StratifiedKFold if kind == "logistic" else KFold
    return cls(n_splits=folds, shuffle=True, random_state=seed)


# ---------------------------------------------------------------- helpers


def _labels(labels: Any, rows: int, kind: str, folds: int) -> tuple[np.ndarray, list[Any] | None]:
    y = labels_array(labels, rows)
    if kind == "ridge":
        if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y.astype(np.float64)).all():
            raise InputError("a ridge probe needs finite numbers as labels")
        if rows < folds or np.ptp(y) == 0:
            raise InputError(f"a ridge probe over {folds} folds needs at least {folds} rows with differing labels")
        return y.astype(np.float64), None
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise InputError(f"the labels hold a single class ({classes[0]!r} if any): a probe needs at least two")
    if counts.min() < folds:
        rare = classes[counts.argmin()].item()
        raise InputError(
            f"class {rare!r} has {counts.min()} row{'' if counts.min() == 1 else 's'}; {folds}-fold cross-validation needs at least {folds} of every "
            f"class (give more rows or fewer folds)"
        )
    return y, classes.tolist()


def _splits(x: np.ndarray, y: np.ndarray, kind: str, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(splitter(kind, folds, seed).split(x, y))


def _cross_validate(x: np.ndarray, y: np.ndarray, splits: list, kind: str, regularization: float) -> np.ndarray:
    """The probe's held-out score on each fold (a training fold of one control class predicts that class)."""
    scores = []
    for train, test in splits:
        if kind == "logistic" and len(np.unique(y[train])) == 1:
            scores.append(float(np.mean(y[test] == y[train][0])))
            continue
        scores.append(float(make_probe(kind, regularization).fit(x[train], y[train]).score(x[test], y[test])))
    return np.asarray(scores)


def _token_types(source: Any, hook: str | None, token_types: Any, rows: int) -> np.ndarray:
    if token_types is not None:
        types = token_types.detach().cpu().numpy() if isinstance(token_types, torch.Tensor) else np.asarray(token_types)
        types = types.reshape(-1)
    else:
        found = row_tokens(source, hook)
        if found is None:
            raise InputError(
                f"the control task needs each row's token type, which this {type(source).__name__} does not say (a "
                "tensor, a store's hook view, or a trace captured at chosen positions): pass token_types= (one per "
                "row), or control=False"
            )
        types = found.numpy()
    if len(types) != rows:
        raise InputError(f"{len(types):,} token types for {rows:,} rows of activations: give one type per row")
    return types


def _baseline(y: np.ndarray, kind: str) -> float:
    """The score of always answering the commonest class (classes), or the mean (R² 0, numbers)."""
    if kind == "ridge":
        return 0.0
    return float(np.unique(y, return_counts=True)[1].max() / len(y))


def _hook_names(source: Any, hooks: str | Sequence[str]) -> list[str]:
    patterns = [hooks] if isinstance(hooks, str) else list(hooks)
    if isinstance(source, Trace):
        available = source.keys()
    elif isinstance(source, Mapping):
        available = list(source)
    elif hasattr(source, "hooks") and hasattr(source, "batches"):
        available = list(source.hooks)
    else:
        raise InputError(
            f"probe_by_layer reads a Trace, an activation store or a mapping of names to activations, "
            f"not a {type(source).__name__}"
        )
    names = [name for name in available if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        raise InputError(f"no hook point matches {patterns}; this source holds {', '.join(map(str, available))}")
    return names
