"""`patch`: one call for an activation-patching sweep, returning a `PatchingResult`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import torch

from ..errors import InputError
from ..inputs import Batch, Inputs, token_strings
from .cells import n_layers, plan
from .engine import cached_run, sweep_cells
from .metrics import Context, Metric, as_metric
from .result import PatchingResult

DIRECTIONS = ("denoise", "noise")
MEMORY_BUDGET = 1 << 30
"""Bytes of activations one stacked forward may use, by default (a rough estimate per row sets the rows)."""


def patch(
    model,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    what: str = "resid_pre",
    by: str | None = None,
    *,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    memory_budget: int = MEMORY_BUDGET,
    progress: bool | None = None,
) -> PatchingResult:
    """Patch `what` cell by cell and measure `metric`: which component carries the clean behaviour?

    `what`: a component (`resid_pre|mid|post`, `attn_out`, `mlp_out`, `z`, `q`, `k`, `v`, `result`, `pattern`)
    swept `by` `"layer_pos"`, `"layer_head"`, `"layer_head_pos"` or `"layer"`; or a hook name or glob, each hook
    point patched whole. `direction="denoise"` puts clean activations into the corrupted run, `"noise"` corrupted
    ones into the clean run. `metric`: `nm.patching.logit_diff(...)`, `prob`, `logprob`, `loss`, `kl`, or a
    function of the logits `[prompt, pos, vocab]` returning one value per prompt. The result is normalised so that
    0 is the corrupted run and 1 the clean run (`.raw` keeps the metric itself). `layers`, `heads`, `positions`
    restrict the sweep. Each forward stacks as many cells as `memory_budget` bytes allow; sweeps of many forwards
    show a progress bar (`progress=False` hides it).
    """
    return sweep(model, clean, corrupt, metric, what, by, direction=direction, layers=layers, heads=heads,
                 positions=positions, memory_budget=memory_budget, progress=progress)


def sweep(
    model,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    what: str,
    by: str | None,
    *,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    memory_budget: int = MEMORY_BUDGET,
    progress: bool | None = None,
    only: Sequence[int] | None = None,
) -> PatchingResult:
    """`patch`, computing only the cells whose indices (in the sweep's order) are in `only` when given (the others
    are NaN): what re-checking an estimate's strongest cells needs."""
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    metric = as_metric(metric)
    n_layers(model)  # refuses, before any forward, a model without block hook points
    clean_batch, corrupt_batch = paired(model, clean, corrupt)
    labels = token_strings(model.tokenizer, clean_batch.tokens[0].tolist())
    cells = plan(model, what, by, labels, layers, heads, positions)
    target_batch, source_batch = (corrupt_batch, clean_batch) if direction == "denoise" else (clean_batch, corrupt_batch)
    names = sorted({name for cell in cells.cells for name, _ in cell.parts})
    target = cached_run(model, target_batch.to(model.device), capture=names)
    source = model.run(source_batch.tokens, attention_mask=source_batch.attention_mask, capture=names)
    there = target.captured
    clean_full = target.logits if direction == "noise" else source.logits
    corrupt_full = source.logits if direction == "noise" else target.logits
    last = target.last
    prompts = torch.arange(len(last), device=last.device)
    at = (lambda logits: logits[prompts, last]) if metric.positions == "last" else (lambda logits: logits)
    context = Context(clean_batch.tokens.to(model.device), clean_batch.attention_mask.to(model.device), last, at(clean_full), model)
    evaluate = metric.bind(context)
    clean_value = evaluate(at(clean_full), prompts).float()
    corrupt_value = evaluate(at(corrupt_full), prompts).float()
    if torch.isclose(clean_value.mean(), corrupt_value.mean(), rtol=0, atol=1e-12):
        raise InputError(
            f"the {metric} is {clean_value.mean().item():.6g} on both the clean and the corrupted prompts: "
            "there is no difference for patching to explain"
        )
    chosen = list(range(len(cells.cells))) if only is None else list(only)
    patched = [cells.cells[i] for i in chosen]
    sources = [tuple(source[name][index] for name, index in cell.parts) for cell in patched]
    targets = [tuple(there[name][index] for name, index in cell.parts) for cell in patched]
    computed, forwards = sweep_cells(
        model, patched, target, sources, targets, evaluate, metric.positions, row_wise=metric.row_wise,
        memory_budget=memory_budget, progress=progress, description=f"patching {what}",
    )
    raw = torch.full((len(cells.cells), computed.shape[1]), float("nan"))
    raw[chosen] = computed
    return PatchingResult(cells, raw, clean_value.cpu(), corrupt_value.cpu(), metric, direction, model.name, forwards)


def paired(model, clean: Inputs, corrupt: Inputs) -> tuple[Batch, Batch]:
    """Clean and corrupted inputs as batches of the same shape, every pair of prompts the same number of tokens."""
    clean_batch, corrupt_batch = model._batch(clean), model._batch(corrupt)
    n_clean, n_corrupt = clean_batch.tokens.shape[0], corrupt_batch.tokens.shape[0]
    if n_clean != n_corrupt:
        raise InputError(f"{n_clean} clean prompt{'s' * (n_clean != 1)} but {n_corrupt} corrupted: patching needs one corrupted prompt per clean one")
    clean_lengths, corrupt_lengths = clean_batch.attention_mask.sum(1), corrupt_batch.attention_mask.sum(1)
    differ = (clean_lengths != corrupt_lengths).nonzero()
    if len(differ):
        i = int(differ[0])
        raise InputError(
            f"clean prompt {i} is {int(clean_lengths[i])} tokens but corrupted prompt {i} is {int(corrupt_lengths[i])}: "
            "patching needs each pair to have the same number of tokens"
        )
    if not torch.equal(clean_batch.attention_mask, corrupt_batch.attention_mask):
        raise InputError("clean and corrupted prompts are padded differently: give both the same attention mask")
    return clean_batch, corrupt_batch

