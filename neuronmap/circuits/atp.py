"""Attribution patching (AtP): every cell of a denoising sweep estimated from one clean forward and one corrupted
forward and backward, and the exact re-check of the cells it ranks highest.

A cell's estimate is the first-order change of the metric when the cell's activation goes from its corrupted to
its clean value: (clean - corrupted activation) . (gradient of the metric there, on the corrupted run), per
prompt. It is a `PatchingResult` on the same axes as `nm.patch`'s, so the two compare cell for cell; first-order
estimates can be far off where the metric saturates (residual-stream cells especially), which `recheck` measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..inputs import token_strings
from ..patching.cells import n_layers, plan
from ..patching.metrics import Context, Metric, as_metric
from ..patching.result import PatchingResult
from ..patching.sweep import paired, sweep
from .ablation import Ablation
from .components import frozen, logits_reader


def atp(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    what: str = "z",
    by: str | None = None,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchingResult:
    """AtP's estimate of `nm.patch(model, clean, corrupt, metric, what, by)` (denoising), from two forwards and one
    backward; `recheck(result, k)` patches its `k` strongest cells exactly."""
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    if isinstance(corrupt, Ablation):
        raise InputError(
            f"atp estimates nm.patch's sweep, which patches from corrupted prompts, not a {corrupt!r}: give prompts "
            "(eap and circuit_metrics take ablations)"
        )
    metric = as_metric(metric)
    n_layers(model)
    clean_batch, corrupt_batch = paired(model, clean, corrupt)
    cells = plan(model, what, by, token_strings(model.tokenizer, clean_batch.tokens[0].tolist()), layers, heads, positions)
    names = sorted({name for cell in cells.cells for name, _ in cell.parts})
    clean_batch, corrupt_batch = clean_batch.to(model.device), corrupt_batch.to(model.device)
    with torch.no_grad():
        clean_run = model.run(clean_batch.tokens, attention_mask=clean_batch.attention_mask, capture=names)
    n_prompts = clean_batch.tokens.shape[0]
    prompts = torch.arange(n_prompts, device=model.device)
    last = clean_batch.last_positions.to(model.device)
    at = logits_reader(metric, last)
    evaluate = metric.bind(Context(clean_batch.tokens, clean_batch.attention_mask, last, at(clean_run.logits, prompts), model))
    with frozen(model.module):
        corrupted = model.run(corrupt_batch.tokens, attention_mask=corrupt_batch.attention_mask, capture=names, capture_grad=names)
        corrupt_values = evaluate(at(corrupted.logits, prompts), prompts).float()
        if not corrupt_values.requires_grad:
            raise InputError(f"the {metric} has no gradient: AtP needs a differentiable metric (nm.patch needs none)")
        corrupt_values.sum().backward()
    clean_values = evaluate(at(clean_run.logits, prompts), prompts).float()
    estimates = []
    for cell in cells.cells:
        change = sum(
            ((clean_run[name][index] - corrupted[name][index].detach()) * corrupted.grad(name)[index]).reshape(n_prompts, -1).sum(1)
            for name, index in cell.parts
        )
        estimates.append(corrupt_values.detach() + change)
    result = PatchingResult(cells, torch.stack(estimates).cpu(), clean_values.cpu(), corrupt_values.detach().cpu(),
                            metric, "denoise", model.name, forwards=2, method="AtP estimate")
    result.source = (model, clean, corrupt, metric, what, by, layers, heads, positions)
    return result


def recheck(estimate: PatchingResult, k: int = 10, **kwargs) -> PatchingResult:
    """The exact denoising values of the `k` strongest cells of an AtP `estimate` (the other cells NaN), computed by
    `nm.patch`'s engine; `kwargs` go to it (`memory_budget`, `progress`)."""
    source = getattr(estimate, "source", None)
    if source is None:
        raise InputError("recheck needs a result of nm.circuits.atp (it reruns that model on those prompts)")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a number of cells of at least 1, got {k!r}")
    model, clean, corrupt, metric, what, by, layers, heads, positions = source
    order = estimate._effect().flatten().nan_to_num(-1).argsort(descending=True)[:k].tolist()
    result = sweep(model, clean, corrupt, metric, what, by, layers=layers, heads=heads, positions=positions,
                   only=order, **kwargs)
    result.method = f"exact re-check of AtP's {len(order)} strongest cells"
    return result
