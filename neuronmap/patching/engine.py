"""Running many patching cells with only the work that changes.

The unit of work is a row: one cell's patch on one prompt. Five shortcuts, each exact (the tests compare them
with one plain forward per cell):
- **Nothing to patch.** A row whose patch writes the value already there (the clean and corrupted runs agree at
  that hook point, e.g. before the first corrupted token of a causal model) is the run being patched: it is read
  from the cached run, without a forward.
- **Layers.** A patch in block L cannot change blocks below it, so blocks 0..L-1 are skipped: while a group of
  rows runs, each of those blocks returns the cached output that block L-1 gave in the run being patched.
- **Positions** (causal models). A row that changes nothing before position p (it patches position p, or the
  two runs agree before p) runs only positions p.. with the cached keys and values of the earlier positions (HF's
  own KV cache), and the logits of earlier positions come from the cached run.
- **The last position.** When the metric reads the last position only, the final block's attention output
  projection and MLP compute that position only (nothing after them mixes positions), and the logits are
  computed there only.
- **Batching.** Rows share one forward by being stacked along the batch, as many as a memory budget allows.
Which rows share a forward is chosen per layer by a small dynamic programme over their first positions that
trades the positions skipped against the number of forwards. A metric that needs each cell's prompts together
(a function of the logits) keeps each cell's rows in one forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import PositionSelection, Recorder
from ..inputs import Batch
from .cells import Cell, n_layers

FORWARD_OVERHEAD = 128
"""What one more forward costs, in token-rows through the model: fixed costs (Python, kernel launches, small
matrices) make a forward of few rows slower per row than a large one."""


Base = Callable[[int, torch.Tensor], dict]
"""Interventions that make the run being patched what it is (e.g. noise on the embeddings), as a function of
(first position run, the prompt of each row) returning `{hook name: function}`."""


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
    captured: dict[str, torch.Tensor] | None = None


@dataclass
class Unit:
    """Rows that go into one forward together: `cell`'s patch on `prompts`, changing nothing before `start`."""

    cell: int
    prompts: list[int]
    start: int


@dataclass
class Group:
    """Units that share one forward: all resume at `layer` and run from position `start`."""

    layer: int
    start: int
    units: list[Unit]


def cached_run(model, batch: Batch, base: Base | None = None, capture: Sequence[str] = ()) -> Run:
    """Run `batch` once (with `base`'s interventions), keeping what the shortcuts resume from and the activations
    at the hook points named in `capture` (after `base`'s interventions)."""
    blocks = [model._points[f"blocks.{layer}.hook_resid_post"].module for layer in range(n_layers(model))]
    causal = is_causal(model)
    outputs: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]
    handles = [
        block.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, _main(output).detach()))
        for i, block in enumerate(blocks)
    ]
    every_prompt = torch.arange(batch.tokens.shape[0])
    recorder = Recorder(PositionSelection(None, batch, batch.tokens.shape[1]), None, None)
    actions = model._actions(list(capture), base(0, every_prompt) if base else {}, recorder)
    try:
        with torch.no_grad(), model._attach(actions):
            kwargs = {"use_cache": True} if causal else model._forward_kwargs
            output = model.module(input_ids=batch.tokens, attention_mask=batch.attention_mask, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    keys_values = None
    if causal:
        keys_values = [(layer.keys, layer.values) for layer in _returned_cache(output).layers]
    return Run(batch, blocks, outputs, output.logits.detach(), keys_values, batch.last_positions, base, recorder.activations)


def sweep_cells(
    model,
    cells: Sequence[Cell],
    run: Run,
    sources: Sequence[tuple[torch.Tensor, ...]],
    targets: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positions: str,
    *,
    row_wise: bool = True,
    memory_budget: int,
    progress: bool | None,
    description: str,
) -> tuple[torch.Tensor, int]:
    """The metric `[cell, prompt]` of every cell (`sources[i]`: the values of cell i's parts, written into `run`,
    whose values there are `targets[i]`), and the forwards it took. `row_wise`: the metric is computed row by row
    (else each cell's prompts are evaluated together)."""
    from tqdm.auto import tqdm

    n_prompts, length = run.batch.tokens.shape
    causal = run.keys_values is not None
    every_prompt = torch.arange(n_prompts, device=run.logits.device)
    unpatched = evaluate(_at(run.logits, run, every_prompt, positions), every_prompt).float().cpu()
    values = unpatched.repeat(len(cells), 1)
    units = []
    for i, cell in enumerate(cells):
        starts = _first_changes(cell, sources[i], targets[i], causal)
        changed = [j for j in range(n_prompts) if starts[j] is not None]
        if row_wise:
            units += [Unit(i, [j], starts[j]) for j in changed]
        elif changed:
            units.append(Unit(i, list(range(n_prompts)), min(starts[j] for j in changed)))
    max_rows = _max_rows(model, length, positions == "all", memory_budget)
    planned = groups(cells, units, length, max_rows, causal)
    show = progress if progress is not None else len(planned) >= 16
    for group in tqdm(planned, desc=description, disable=not show, leave=False):
        computed = run_group(model, group, cells, run, sources, evaluate, positions).float().cpu()
        row = 0
        for unit in group.units:
            values[unit.cell, unit.prompts] = computed[row : row + len(unit.prompts)]
            row += len(unit.prompts)
    return values, len(planned)


def _first_changes(cell: Cell, source: tuple, target: tuple, causal: bool) -> list[int | None]:
    """For each prompt, the first position the cell's patch changes (None: it writes what is already there)."""
    n_prompts = source[0].shape[0]
    first: list[int | None] = [None] * n_prompts
    for value, there in zip(source, target):
        differs = (value != there).reshape(n_prompts, -1).any(1) if cell.position is not None else None
        for j in range(n_prompts):
            if cell.position is not None:
                start = cell.position if differs[j] else None
            else:
                start = _first_differing_position(value[j], there[j]) if causal else (0 if not torch.equal(value[j], there[j]) else None)
            if start is not None:
                first[j] = start if first[j] is None else min(first[j], start)
    return first


def _first_differing_position(value: torch.Tensor, there: torch.Tensor) -> int | None:
    """The first index along the first dimension (the positions) where the two differ, None if they are equal."""
    if value.dim() == 0:
        return None if torch.equal(value, there) else 0
    differs = (value != there).reshape(value.shape[0], -1).any(1).nonzero()
    return int(differs[0]) if len(differs) else None


def groups(cells: Sequence[Cell], units: list[Unit], length: int, max_rows: int, causal: bool) -> list[Group]:
    """Units grouped into forwards: by the layer they resume at, then into runs of consecutive first positions
    chosen to minimise token-rows computed plus `FORWARD_OVERHEAD` per forward (in causal models)."""
    per_layer: dict[int, list[Unit]] = {}
    for unit in units:
        per_layer.setdefault(cells[unit.cell].layer, []).append(unit)
    result = []
    for layer, members in per_layer.items():
        if not causal:
            for unit in members:
                unit.start = 0
        members.sort(key=lambda unit: unit.start)
        result += [Group(layer, members[i].start, members[i:j]) for i, j in _split(members, length, max_rows)]
    return result


def _split(members: list[Unit], length: int, max_rows: int) -> list[tuple[int, int]]:
    """Bounds of consecutive runs of `members` (sorted by start) of at most `max_rows` rows, minimising cost."""
    n = len(members)
    rows = [0]
    for unit in members:
        rows.append(rows[-1] + len(unit.prompts))
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j units
    split = [0] * (n + 1)
    for j in range(1, n + 1):
        i = j - 1
        while i >= 0 and (rows[j] - rows[i] <= max_rows or i == j - 1):
            cost = best[i] + (rows[j] - rows[i]) * (length - members[i].start) + FORWARD_OVERHEAD
            if cost < best[j]:
                best[j], split[j] = cost, i
            i -= 1
    bounds, j = [], n
    while j > 0:
        bounds.append((split[j], j))
        j = split[j]
    return list(reversed(bounds))


def run_group(
    model,
    group: Group,
    cells: Sequence[Cell],
    run: Run,
    sources: Sequence[tuple[torch.Tensor, ...]],
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    positions: str,
) -> torch.Tensor:
    """The metric of each row of one group (units in order), from one forward of the stacked rows."""
    length = run.batch.tokens.shape[1]
    start = group.start
    device = run.logits.device
    prompts = torch.tensor([j for unit in group.units for j in unit.prompts], device=device)
    tokens = run.batch.tokens[prompts, start:]
    mask = run.batch.attention_mask[prompts]
    kwargs = dict(model._forward_kwargs)
    if start > 0:
        kwargs.update({"use_cache": True, _cache_parameter(model.module): _cache(model, run, group.layer, start, prompts)})
    last_only = positions == "last" and bool((run.last[prompts] == length - 1).all()) and _accepts(model.module, "logits_to_keep")
    if last_only:
        kwargs["logits_to_keep"] = 1
    interventions = _writes(group, cells, sources, start, device)
    resume = run.block_outputs[group.layer - 1][prompts, start:] if group.layer > 0 else None
    base = run.base(start, prompts) if run.base else {}
    final = len(run.blocks) - 1
    trimmed = _per_position_modules(model, final) if last_only and not _touches(final, {**base, **interventions}) else []
    with (
        torch.no_grad(),
        model.hooks(base),
        model.hooks(interventions),
        _skipping(run.blocks[: group.layer], resume),
        _last_position_only(trimmed),
    ):
        logits = model.module(input_ids=tokens, attention_mask=mask, **kwargs).logits
    if positions == "last":
        logits = logits[:, -1] if last_only else _last_logits(logits, run, start, prompts)
    else:
        logits = torch.cat([run.logits[prompts, :start], logits], dim=1)
    return evaluate(logits, prompts)


def _writes(group: Group, cells: Sequence[Cell], sources: Sequence[tuple[torch.Tensor, ...]], start: int, device) -> dict[str, Callable]:
    """One intervention per hook point, writing each unit's source values into its own rows."""
    per_name: dict[str, list[tuple[torch.Tensor, tuple, torch.Tensor]]] = {}
    row = 0
    for unit in group.units:
        cell = cells[unit.cell]
        rows = torch.arange(row, row + len(unit.prompts), device=device)
        row += len(unit.prompts)
        for (name, index), value in zip(cell.parts, sources[unit.cell]):
            value = value[unit.prompts]
            if cell.position is not None:
                index = _shifted(index, start)
            elif start > 0:
                value = value[:, start:]  # every position: only those run (the earlier ones are unchanged)
            per_name.setdefault(name, []).append((rows, index, value))

    def writer(entries: list[tuple[torch.Tensor, tuple, torch.Tensor]]) -> Callable:
        def write(activation: torch.Tensor, hook) -> None:
            for rows, index, value in entries:
                activation[(rows, *index[1:])] = value

        return write

    return {name: writer(entries) for name, entries in per_name.items()}


def _at(logits: torch.Tensor, run: Run, prompts: torch.Tensor, positions: str) -> torch.Tensor:
    return logits[prompts, run.last[prompts]] if positions == "last" else logits[prompts]


def is_causal(model) -> bool:
    """Whether the model attends only to earlier positions and keeps HF's KV cache (so the position shortcut holds)."""
    config = model._config
    return bool(getattr(config, "use_cache", False)) and not getattr(config, "is_encoder_decoder", False) and model.architecture != "bert"


def _max_rows(model, length: int, all_positions: bool, budget: int) -> int:
    """Rows one forward may stack: a rough per-row estimate of activations, attention and logits against `budget`."""
    config = model._config
    d_model = getattr(config, "hidden_size", 768)
    heads = getattr(config, "num_attention_heads", 12)
    vocab = getattr(config, "vocab_size", 50_000)
    per_row = 4 * length * (16 * d_model + 2 * heads * length + (vocab if all_positions else 0)) + 4 * vocab
    return max(1, budget // per_row)


def _shifted(index: tuple, start: int) -> tuple:
    """A one-position cell's `index` with its position (dimension 1) counted from `start`, as in an activation of
    positions start.."""
    return (index[0], index[1] - start, *index[2:])


def _last_logits(logits: torch.Tensor, run: Run, start: int, prompts: torch.Tensor) -> torch.Tensor:
    """Each row's logits at its prompt's last real position: computed when at or after `start`, else cached."""
    last = run.last[prompts]
    computed = logits[torch.arange(len(prompts), device=logits.device), (last - start).clamp(min=0)]
    cached = run.logits[prompts, last]
    return torch.where((last >= start).unsqueeze(-1), computed, cached)


def _cache(model, run: Run, layer: int, start: int, prompts: torch.Tensor):
    """HF's KV cache holding the cached run's keys and values of positions < `start`, for every row (of `prompts`).

    Blocks below `layer` are skipped and never read theirs, so they get a placeholder of the right length only.
    """
    from transformers import DynamicCache

    data = []
    for i, (keys, values) in enumerate(run.keys_values):
        if i < layer:
            placeholder = keys[prompts, :1, :start, :1]
            data.append((placeholder, placeholder))
        else:
            data.append((keys[prompts, :, :start], values[prompts, :, :start]))
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


_TRIMMABLE = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"}
"""Families whose final block's attention output projection and MLP are modules that work position by position
and return a tensor."""


def _per_position_modules(model, layer: int) -> list[nn.Module]:
    """Block `layer`'s attention output projection and MLP, where only the last position's outputs can reach the
    last position's logits (the final block: nothing after it mixes positions)."""
    if model.architecture not in _TRIMMABLE:
        return []
    z, mlp = model._points[f"blocks.{layer}.attn.hook_z"], model._points[f"blocks.{layer}.hook_mlp_out"]
    return [z.module, mlp.module] if z.site == "input" and mlp.site == "output" else []


def _touches(layer: int, interventions: dict) -> bool:
    """Whether any of `interventions` writes in block `layer` or after it."""
    return any(name.startswith(f"blocks.{layer}.") or name.startswith("ln_final") for name in interventions)


@contextlib.contextmanager
def _last_position_only(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While inside, each of `modules` computes its last position only and outputs zeros at the others: exact for
    the last position's logits when nothing after the modules reads the other positions (the final block's
    position-wise modules, with the logits kept for the last position only)."""
    lengths: dict[nn.Module, int] = {}

    def keep_last(module, args):
        lengths[module] = args[0].shape[1]
        return (args[0][:, -1:], *args[1:])

    def pad(module, args, output):
        padded = output.new_zeros(output.shape[0], lengths[module], *output.shape[2:])
        padded[:, -1:] = output
        return padded

    handles = []
    try:
        for module in modules:
            handles += [module.register_forward_pre_hook(keep_last), module.register_forward_hook(pad)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def _main(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _accepts(module: nn.Module, parameter: str) -> bool:
    return parameter in inspect.signature(module.forward).parameters


def _cache_parameter(module: nn.Module) -> str:
    """The forward's KV-cache argument: `cache` from transformers 5.25 on (`past_key_values` is deprecated there)."""
    return "cache" if _accepts(module, "cache") else "past_key_values"


def _returned_cache(output):
    """The KV cache a forward returned, under either of its names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
