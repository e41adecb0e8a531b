"""Running many patching cells with only the work that changes.

Three shortcuts, each exact (the tests compare them with one plain forward per cell):
- **Layers.** A patch in block L cannot change blocks below it, so blocks 0..L-1 are skipped: while a group of
  cells runs, each of those blocks returns the cached output that block L-1 gave in the run being patched.
- **Positions** (causal models). A patch at position p cannot change earlier positions, so a group of cells whose
  positions are all ≥ p0 runs only positions p0.. with the cached keys and values of positions < p0 (HF's own
  KV cache), and the logits of earlier positions come from the cached run.
- **Batching.** Cells share one forward by being stacked along the batch (cell c's copy of the prompts is rows
  c·P … c·P + P - 1), as many as a memory budget allows.
Which cells share a forward is chosen per layer by a small dynamic programme over their positions that trades
the positions skipped against the number of forwards.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..inputs import Batch
from .cells import Cell, n_layers

FORWARD_OVERHEAD = 512
"""What one more forward costs, in token-rows through the model: fixed costs (Python, kernel launches, small
matrices) make a forward of few rows slower per row than a large one."""


Base = Callable[[int, int], dict]
"""Interventions that make the run being patched what it is (e.g. noise on the embeddings), as a function of
(first position run, number of stacked copies of the prompts) returning `{hook name: function}`."""


@dataclass
class Run:
    """The run being patched, cached: its inputs, each block's output, its logits and (causal models) its keys and
    values per layer; `last` is each prompt's last real position; `base` its own interventions, if any."""

    batch: Batch
    blocks: list[nn.Module]
    block_outputs: list[torch.Tensor]
    logits: torch.Tensor
    keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None
    last: torch.Tensor
    base: Base | None = None


@dataclass
class Group:
    """Cells that share one forward: all resume at `layer` and run from position `start`."""

    layer: int
    start: int
    cells: list[tuple[int, Cell]]


def cached_run(model, batch: Batch, base: Base | None = None) -> Run:
    """Run `batch` once (with `base`'s interventions), keeping what the shortcuts resume from."""
    blocks = [model._points[f"blocks.{layer}.hook_resid_post"].module for layer in range(n_layers(model))]
    causal = is_causal(model)
    outputs: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]
    handles = [
        block.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, _main(output).detach()))
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad(), model.hooks(base(0, 1) if base else {}):
            kwargs = {"use_cache": True} if causal else model._forward_kwargs
            output = model.module(input_ids=batch.tokens, attention_mask=batch.attention_mask, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    keys_values = None
    if causal:
        keys_values = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
    return Run(batch, blocks, outputs, output.logits.detach(), keys_values, batch.last_positions, base)


def sweep_cells(
    model,
    cells: Sequence[Cell],
    run: Run,
    sources: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positions: str,
    *,
    memory_budget: int,
    progress: bool | None,
    description: str,
) -> tuple[torch.Tensor, int]:
    """The metric `[cell, prompt]` of every cell (`sources[i]`: the values of cell i's parts, written into `run`),
    and the forwards it took."""
    from tqdm.auto import tqdm

    n_prompts, length = run.batch.tokens.shape
    max_rows = _max_rows(model, n_prompts, length, positions == "all", memory_budget)
    planned = groups(cells, n_prompts, length, max_rows, run.keys_values is not None)
    values = torch.empty(len(cells), n_prompts)
    show = progress if progress is not None else len(planned) >= 16
    for group in tqdm(planned, desc=description, disable=not show, leave=False):
        values[[i for i, _ in group.cells]] = run_group(model, group, run, sources, evaluate, positions).float().cpu()
    return values, len(planned)


def is_causal(model) -> bool:
    """Whether the model attends only to earlier positions and keeps HF's KV cache (so the position shortcut holds)."""
    config = model._config
    return bool(getattr(config, "use_cache", False)) and not getattr(config, "is_encoder_decoder", False) and model.architecture != "bert"


def _max_rows(model, n_prompts: int, length: int, all_positions: bool, budget: int) -> int:
    """Rows one forward may stack: a rough per-row estimate of activations, attention and logits against `budget`."""
    config = model._config
    d_model = getattr(config, "hidden_size", 768)
    heads = getattr(config, "num_attention_heads", 12)
    vocab = getattr(config, "vocab_size", 50_000)
    per_row = 4 * length * (16 * d_model + 2 * heads * length + (vocab if all_positions else 0)) + 4 * vocab
    return max(n_prompts, budget // per_row // n_prompts * n_prompts)


def groups(cells: Sequence[Cell], n_prompts: int, length: int, max_rows: int, causal: bool) -> list[Group]:
    """Cells grouped into forwards: by the layer they resume at, then (causal models, cells at one position each)
    into runs of consecutive positions chosen to minimise token-rows computed plus `FORWARD_OVERHEAD` per forward."""
    per_layer: dict[int, list[tuple[int, Cell]]] = {}
    for i, cell in enumerate(cells):
        per_layer.setdefault(cell.layer, []).append((i, cell))
    per_forward = max(1, max_rows // n_prompts)
    result = []
    for layer, members in per_layer.items():
        if causal and all(cell.position is not None for _, cell in members):
            members = sorted(members, key=lambda member: member[1].position)
            result += _by_position(layer, members, n_prompts, length, per_forward)
        else:
            result += [Group(layer, 0, members[i : i + per_forward]) for i in range(0, len(members), per_forward)]
    return result


def _by_position(layer: int, members: list[tuple[int, Cell]], n_prompts: int, length: int, per_forward: int) -> list[Group]:
    """Split cells sorted by position into consecutive forwards of at most `per_forward` cells, minimising cost."""
    n = len(members)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j cells
    split = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - per_forward), j):
            start = members[i][1].position
            cost = best[i] + (j - i) * n_prompts * (length - start) + FORWARD_OVERHEAD
            if cost < best[j]:
                best[j], split[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((split[j], j))
        j = split[j]
    return [Group(layer, members[i][1].position, members[i:j]) for i, j in reversed(bounds)]


def run_group(
    model,
    group: Group,
    run: Run,
    sources: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positions: str,
) -> torch.Tensor:
    """The metric `[cells, prompts]` for one group's cells, from one forward of the stacked rows."""
    n_prompts, length = run.batch.tokens.shape
    n_cells, start = len(group.cells), group.start
    rows = n_cells * n_prompts
    tokens = run.batch.tokens[:, start:].repeat(n_cells, 1)
    mask = run.batch.attention_mask.repeat(n_cells, 1)
    kwargs = dict(model._forward_kwargs)
    if start > 0:
        kwargs.update(use_cache=True, past_key_values=_cache(model, run, group.layer, start, n_cells))
    last_only = positions == "last" and bool((run.last == length - 1).all()) and _accepts(model.module, "logits_to_keep")
    if last_only:
        kwargs["logits_to_keep"] = 1
    interventions = _writes(group, sources, start, n_prompts)
    resume = run.block_outputs[group.layer - 1][:, start:].repeat(n_cells, 1, 1) if group.layer > 0 else None
    base = run.base(start, n_cells) if run.base else {}
    with torch.no_grad(), model.hooks(base), model.hooks(interventions), _skipping(run.blocks[: group.layer], resume):
        logits = model.module(input_ids=tokens, attention_mask=mask, **kwargs).logits
    prompts = torch.arange(rows, device=logits.device) % n_prompts
    if positions == "last":
        logits = logits[:, -1] if last_only else _last_logits(logits, run, start, prompts)
    else:
        logits = torch.cat([run.logits[prompts, :start], logits], dim=1)
    return evaluate(logits, prompts).reshape(n_cells, n_prompts)


def _writes(group: Group, sources: Sequence[tuple[torch.Tensor, ...]], start: int, n_prompts: int) -> dict[str, Callable]:
    """One intervention per hook point, writing each cell's source values into its own rows."""
    per_name: dict[str, list[tuple[slice, tuple, torch.Tensor]]] = {}
    for c, (i, cell) in enumerate(group.cells):
        rows = slice(c * n_prompts, (c + 1) * n_prompts)
        for (name, index), value in zip(cell.parts, sources[i]):
            per_name.setdefault(name, []).append((rows, _shifted(index, start), value))

    def writer(entries: list[tuple[slice, tuple, torch.Tensor]]) -> Callable:
        def write(activation: torch.Tensor, hook) -> None:
            for rows, index, value in entries:
                activation[rows][index] = value

        return write

    return {name: writer(entries) for name, entries in per_name.items()}


def _shifted(index: tuple, start: int) -> tuple:
    """`index` with its position (dimension 1) counted from `start`, as in an activation of positions start.."""
    if start == 0 or len(index) < 2:
        return index
    return (index[0], index[1] - start, *index[2:])


def _last_logits(logits: torch.Tensor, run: Run, start: int, prompts: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its prompt's last real position: computed when at or after `start`, else cached."""
    last = run.last[prompts]
    computed = logits[torch.arange(len(prompts), device=logits.device), (last - start).clamp(min=0)]
    cached = run.logits[prompts, last]
    return torch.where((last >= start).unsqueeze(-1), computed, cached)


def _cache(model, run: Run, layer: int, start: int, n_cells: int):
    """HF's KV cache holding the cached run's keys and values of positions < `start`, for every row.

    Blocks below `layer` are skipped and never read theirs, so they get a placeholder of the right length only.
    """
    from transformers import DynamicCache

    data = []
    for i, (keys, values) in enumerate(run.keys_values):
        if i < layer:
            placeholder = keys[:, :1, :start, :1].repeat(n_cells, 1, 1, 1)
            data.append((placeholder, placeholder))
        else:
            data.append((keys[:, :, :start].repeat(n_cells, 1, 1, 1), values[:, :, :start].repeat(n_cells, 1, 1, 1)))
    return DynamicCache(ddp_cache_data=data, config=model.module.config)


@contextlib.contextmanager
def _skipping(blocks: Sequence[nn.Module], output: torch.Tensor | None) -> Iterator[None]:
    """While inside, each of `blocks` returns `output` (the cached output of the last of them) without computing."""
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    try:
        for block in blocks:
            block.forward = lambda *args, **kwargs: output
        yield
    finally:
        for block, forward in saved:
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _main(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _accepts(module: nn.Module, parameter: str) -> bool:
    return parameter in inspect.signature(module.forward).parameters
