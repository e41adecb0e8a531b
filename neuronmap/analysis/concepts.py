"""Concept activation vectors and TCAV (Kim et al. 2018), and concept directions as steering interventions.

`cav` separates a concept's activations from counterexamples' with a linear probe (see `probe`) and keeps the unit
normal of its boundary, pointing towards the concept; `concept_activation_vector` does so from texts through a
model. `tcav` asks how often nudging a hook's activation along a concept's CAV raises a target logit (or logit
difference): the fraction of target inputs whose directional derivative is positive, over CAVs trained against
several random samples, compared by a two-sided t-test with CAVs trained between two random samples (Bonferroni-
corrected over several concepts). `ConceptDirection`s add, subtract and scale (concept algebra) and `.steer` turns
one into an intervention. scikit-learn fits the CAVs and scipy runs the t-test; the sampling, the directional
derivatives and the steering are written here.
"""

from __future__ import annotations

import warnings

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from ..circuits.components import frozen
from ..errors import InputError
from .activations import as_matrix
from .concept_view import ConceptDirection, TCAVResult
from .lenses import token_id
from .probes import probe

POSITIONS = ("last", "all")
BATCH = 32
"""Texts per forward pass when reading activations or gradients."""

Target = Union[int, str, tuple, Sequence, Callable]


def cav(
    concept: Any,
    counterexamples: Any,
    hook: str | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    regularization: float = 1.0,
    name: str = "concept",
) -> ConceptDirection:
    """The concept activation vector separating `concept`'s rows from `counterexamples`' (each anything `as_matrix`
    reads, with `hook`): the unit normal of a logistic probe's boundary, in the activations' units, pointing towards
    the concept, with the probe's `folds`-fold cross-validated accuracy as `.accuracy`."""
    return _fit(as_matrix(concept, hook), as_matrix(counterexamples, hook), hook, folds, seed, regularization, name)


def concept_activation_vector(
    model: Any,
    concept_texts: Sequence[str],
    random_texts: Sequence[str],
    hook: str,
    positions: str = "last",
    *,
    folds: int = 5,
    seed: int = 0,
    regularization: float = 1.0,
    name: str = "concept",
) -> ConceptDirection:
    """`cav` from `model`'s activations at `hook` on `concept_texts` against `random_texts`: one row per text at
    its last real token (`positions="last"`) or one per real token (`"all"`)."""
    point = _one_hook(model, hook)
    _positions(positions)
    concept = torch.cat(_rows(model, concept_texts, point, positions, "concept_texts"))
    counter = torch.cat(_rows(model, random_texts, point, positions, "random_texts"))
    return _fit(concept, counter, point, folds, seed, regularization, name)


def directional_derivatives(
    model: Any, texts: Sequence[str], direction: ConceptDirection | torch.Tensor, target: Target, *,
    hook: str | None = None, positions: str = "last",
) -> torch.Tensor:
    """`[texts]`: the derivative of each text's target (see `tcav`) along `direction` added to its activation at
    the direction's hook: at the last real token (`"last"`) or at every real token at once (`"all"`)."""
    if isinstance(direction, ConceptDirection):
        hook, vector = hook or direction.hook, direction.vector
    else:
        vector = torch.as_tensor(direction)
    if hook is None:
        raise InputError("the direction has no hook point: pass hook=")
    point = _one_hook(model, hook)
    _positions(positions)
    gradients = _target_gradients(model, texts, point, target, positions)
    if gradients.shape[1] != vector.numel():
        raise InputError(f"the direction is {vector.numel()} wide; {point} is {gradients.shape[1]} wide")
    return gradients @ vector.reshape(-1).to(gradients.dtype)


def tcav(
    model: Any,
    target_texts: Sequence[str],
    concept_texts: Sequence[str] | Mapping[str, Sequence[str]],
    random_texts_pool: Sequence[str],
    hook: str,
    target: Target,
    *,
    runs: int = 10,
    random_runs: int = 10,
    alpha: float = 0.05,
    seed: int = 0,
    positions: str = "last",
    folds: int = 5,
) -> TCAVResult:
    """TCAV scores of one concept (a list of texts) or several (`{name: texts}`) for `target` on `target_texts`.

    `target`: a token (id or single-token string) whose logit at each text's last real position is the quantity
    explained, a pair `(token, wrong token)` for their logit difference, a list of such per target text, or a
    function of the run's `Trace` returning one number per text. Each of `runs` CAVs is trained against its own
    random sample (as many texts as the concept has) from `random_texts_pool`; each of `random_runs` random CAVs
    between two disjoint such samples. A score is the fraction of target texts whose directional derivative along
    the CAV is positive. A concept is significant when the two-sided t-test of its scores against the random CAVs'
    gives p < `alpha` after Bonferroni correction over the concepts.
    """
    from scipy.stats import ttest_ind

    point = _one_hook(model, hook)
    _positions(positions)
    concepts = dict(concept_texts) if isinstance(concept_texts, Mapping) else {"concept": concept_texts}
    for count, what in ((runs, "runs"), (random_runs, "random_runs")):
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise InputError(f"{what} must be an int of at least 2 (a t-test needs a spread), got {count!r}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie between 0 and 1, got {alpha!r}")
    if not concepts:
        raise InputError("no concepts given")
    size = max(len(texts) for texts in concepts.values())
    if len(random_texts_pool) < 2 * size:
        raise InputError(
            f"random_texts_pool has {len(random_texts_pool)} texts; random CAVs need two disjoint samples as large "
            f"as the largest concept ({size} texts), so at least {2 * size}"
        )
    pool = _rows(model, random_texts_pool, point, positions, "random_texts_pool")
    gradients = _target_gradients(model, target_texts, point, target, positions)
    rng = np.random.default_rng(seed)

    def score(direction: ConceptDirection) -> float:
        return float((gradients @ direction.vector.to(gradients.dtype) > 0).double().mean())

    def sample(count: int, exclude: np.ndarray = np.empty(0, dtype=np.int64)) -> tuple[torch.Tensor, np.ndarray]:
        chosen = rng.choice(np.setdiff1d(np.arange(len(pool)), exclude), size=count, replace=False)
        return torch.cat([pool[i] for i in chosen]), chosen

    cavs, scores = {}, {}
    for name, texts in concepts.items():
        rows = torch.cat(_rows(model, texts, point, positions, f"concept {name!r}"))
        cavs[name] = [_fit(rows, sample(len(texts))[0], point, folds, seed + r, 1.0, name) for r in range(runs)]
        scores[name] = np.array([score(c) for c in cavs[name]])
    random_cavs = []
    for r in range(random_runs):
        first, chosen = sample(size)
        random_cavs.append(_fit(first, sample(size, chosen)[0], point, folds, seed + r, 1.0, "random"))
    random_scores = np.array([score(c) for c in random_cavs])
    p_values = {name: _two_sided_p(ttest_ind, s, random_scores) for name, s in scores.items()}
    return TCAVResult(scores, random_scores, p_values, cavs=cavs, random_cavs=random_cavs, alpha=alpha, hook=point,
                      target=_describe(target), targets=len(gradients))


# ---------------------------------------------------------------- helpers


def _fit(concept: torch.Tensor, counter: torch.Tensor, hook: str | None, folds: int, seed: int,
         regularization: float, name: str) -> ConceptDirection:
    if concept.shape[1] != counter.shape[1]:
        raise InputError(
            f"the concept's activations are {concept.shape[1]} wide and the counterexamples' {counter.shape[1]}: "
            "give both from the same hook point"
        )
    for rows, what in ((concept, "concept"), (counter, "counterexample")):
        if len(rows) < folds:
            raise InputError(f"the {what} set has {len(rows)} rows; {folds}-fold cross-validation needs at least "
                             f"{folds} (give more or pass a smaller folds=)")
    x = torch.cat([concept, counter])
    labels = np.r_[np.ones(len(concept), dtype=np.int64), np.zeros(len(counter), dtype=np.int64)]
    result = probe(x, labels, kind="logistic", folds=folds, control=False, seed=seed, regularization=regularization)
    normal = result.direction
    return ConceptDirection(normal / normal.norm(), hook, name=name, accuracy=result.accuracy)


def _rows(model: Any, texts: Sequence[str], hook: str, positions: str, what: str) -> list[torch.Tensor]:
    """Each text's rows of activations at `hook`, `[1, d]` at its last real token or `[tokens, d]`."""
    if isinstance(texts, str) or not len(texts):
        raise InputError(f"{what} must be a non-empty list of texts")
    rows = []
    for start in range(0, len(texts), BATCH):
        chunk = list(texts[start : start + BATCH])
        if positions == "last":
            trace = model.run(chunk, capture=hook, capture_positions="last")
            rows.extend(as_matrix(trace[hook][:, 0].flatten(1)).split(1))
        else:
            trace = model.run(chunk, capture=hook)
            values, mask = trace[hook], trace.attention_mask.bool()
            rows.extend(as_matrix(v[m].flatten(1)) for v, m in zip(values, mask))
    return rows


def _target_gradients(model: Any, texts: Sequence[str], hook: str, target: Target, positions: str) -> torch.Tensor:
    """`[texts, d]`: the gradient of each text's target at `hook`, at its last real token or summed over its real
    tokens (so `gradient @ v` is the derivative along `v` added there)."""
    if isinstance(texts, str) or not len(texts):
        raise InputError("target_texts must be a non-empty list of texts")
    per_text = _per_text_targets(model, target, len(texts))
    gradients = []
    for start in range(0, len(texts), BATCH):
        chunk = list(texts[start : start + BATCH])
        with frozen(model.module):  # the backward fills the hook's gradient, not the parameters' .grad
            trace = model.run(chunk, capture_grad=hook)
            mask = trace.attention_mask.bool()
            last = (torch.arange(mask.shape[1]) * mask).argmax(1)
            values = _target_values(trace, last, per_text[start : start + BATCH] if per_text else target, model)
            values.sum().backward()
        grad = trace.grad(hook).flatten(2).double()
        if positions == "last":
            gradients.append(grad[torch.arange(len(last)), last])
        else:
            gradients.append((grad * mask[..., None].to(grad.device)).sum(1))
    return torch.cat(gradients).cpu()


def _per_text_targets(model: Any, target: Target, count: int) -> list | None:
    """A list of per-text targets (each a token or a pair), checked; None for one target shared by every text."""
    if isinstance(target, list):
        if len(target) != count:
            raise InputError(f"{len(target)} targets for {count} target texts: give one per text, or one for all")
        return target
    return None


def _target_values(trace: Any, last: torch.Tensor, target: Any, model: Any) -> torch.Tensor:
    if callable(target):
        values = torch.as_tensor(target(trace))
        if values.shape != (len(last),):
            raise InputError(f"the target function returned shape {list(values.shape)}; give one number per text "
                             f"([{len(last)}])")
        return values
    logits = trace.logits[torch.arange(len(last)), last.to(trace.logits.device)]
    vocab = logits.shape[-1]
    targets = target if isinstance(target, list) else [target] * len(last)
    values = []
    for row, one in zip(logits, targets):
        if isinstance(one, (tuple, list)):
            if len(one) != 2:
                raise InputError(f"a target pair is (token, wrong token), got {len(one)} items")
            values.append(row[token_id(model, one[0], vocab, "target")] - row[token_id(model, one[1], vocab, "wrong")])
        else:
            values.append(row[token_id(model, one, vocab, "target")])
    return torch.stack(values)


def _two_sided_p(ttest: Callable, scores: np.ndarray, random_scores: np.ndarray) -> float:
    """The t-test's p-value; when both samples are constant it is 1 for equal means and 0 for different ones."""
    with warnings.catch_warnings():  # scipy warns on (near-)constant samples, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest(scores, random_scores).pvalue)
    if np.isnan(p):
        return 1.0 if np.isclose(scores.mean(), random_scores.mean()) else 0.0
    return p


def _one_hook(model: Any, hook: str) -> str:
    names = model.resolve(hook)
    if len(names) != 1:
        raise InputError(f"a concept lives at one hook point; {hook!r} names {len(names)}: {names[:4]}")
    return names[0]


def _positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise InputError(f"positions must be one of {POSITIONS}, not {positions!r}")


def _describe(target: Target) -> str:
    if callable(target):
        return getattr(target, "__name__", "a function of the trace")
    if isinstance(target, list):
        return f"a target per text ({len(target)})"
    if isinstance(target, tuple):
        return f"logit[{target[0]!r}] − logit[{target[1]!r}]"
    return f"logit[{target!r}]"
