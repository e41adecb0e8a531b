"""Path patching (Wang et al., 2022, the IOI circuit): a sender's effect on receivers through the direct path only.

For each sender (a head, or an MLP), one run of the target prompts has the sender's output from the source run
and every other head and MLP frozen to its target-run output, so the sender's change reaches what reads the
residual stream directly and nothing else. With `receivers="logits"` that run's logits are measured. With
receiver heads, their inputs (`hook_q`, `hook_k` or `hook_v` of one head) are recorded in that run, and a second
run of the target prompts, free otherwise, takes only those inputs and is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..inputs import Inputs
from .cells import Cell, Plan, n_layers
from .metrics import Context, Metric, as_metric
from .result import PatchingResult
from .sweep import DIRECTIONS, MEMORY_BUDGET, paired

Receiver = tuple[int, int, str]
SENDERS = ("heads", "mlps")


def path_patch(
    model,
    clean: Inputs,
    corrupt: Inputs,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    senders: str = "heads",
    receivers: str | Sequence[Receiver] = "logits",
    *,
    direction: str = "noise",
    memory_budget: int = MEMORY_BUDGET,
) -> PatchingResult:
    """The effect of each sender on `receivers` through the direct path, as a `PatchingResult` (layer × head for
    `senders="heads"`, by layer for `"mlps"`), normalised so that 0 is the corrupted run and 1 the clean run.

    `receivers`: `"logits"` (the final residual stream), or (layer, head, "q" | "k" | "v") inputs of heads.
    `direction="noise"` (the IOI paper's) sends corrupted activations into the clean run; `"denoise"` clean ones
    into the corrupted run.
    """
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    layers = n_layers(model)
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    if senders not in SENDERS:
        raise InputError(f"senders must be one of {SENDERS}, not {senders!r}")
    metric = as_metric(metric)
    receiving = _receivers(model, receivers, layers)
    clean_batch, corrupt_batch = paired(model, clean, corrupt)
    target, source = (clean_batch, corrupt_batch) if direction == "noise" else (corrupt_batch, clean_batch)
    frozen = [f"blocks.{layer}.attn.hook_z" for layer in range(layers)] + [f"blocks.{layer}.hook_mlp_out" for layer in range(layers)]
    target_trace = model.run(target.tokens, attention_mask=target.attention_mask, capture=frozen)
    source_trace = model.run(source.tokens, attention_mask=source.attention_mask, capture=frozen)
    cells, axes = _senders(model, senders, layers, target_trace)
    clean_trace, corrupt_trace = (target_trace, source_trace) if direction == "noise" else (source_trace, target_trace)
    last = target.last_positions.to(model.device)
    prompts = torch.arange(len(last), device=last.device)
    at = (lambda logits: logits[prompts, last]) if metric.positions == "last" else (lambda logits: logits)
    context = Context(clean_batch.tokens.to(model.device), clean_batch.attention_mask.to(model.device), last, at(clean_trace.logits), model)
    evaluate = metric.bind(context)
    clean_value, corrupt_value = evaluate(at(clean_trace.logits), prompts), evaluate(at(corrupt_trace.logits), prompts)
    n_prompts = len(last)
    per_forward = max(1, _rows(model, target.tokens.shape[1], memory_budget) // n_prompts)
    values = torch.empty(len(cells), n_prompts)
    forwards = 0
    for first in range(0, len(cells), per_forward):
        chunk = cells[first : first + per_forward]
        tokens = target.tokens.repeat(len(chunk), 1).to(model.device)
        mask = target.attention_mask.repeat(len(chunk), 1).to(model.device)
        freeze = _frozen_run(frozen, chunk, target_trace, source_trace, n_prompts)
        capture = sorted({name for name, _ in receiving.values()}) if receiving else []
        with torch.no_grad():
            sent = model.run(tokens, attention_mask=mask, interventions=freeze, capture=capture)
            forwards += 1
            logits = sent.logits
            if receiving:
                taken = {name: _taking(sent[name], [index for n, index in receiving.values() if n == name]) for name in capture}
                logits = model.run(tokens, attention_mask=mask, interventions=taken).logits
                forwards += 1
        rows = torch.arange(len(tokens), device=logits.device) % n_prompts
        chosen = logits[torch.arange(len(tokens)), last[rows]] if metric.positions == "last" else logits
        values[first : first + len(chunk)] = evaluate(chosen, rows).reshape(len(chunk), n_prompts).float().cpu()
    what = f"{senders} → {'logits' if not receiving else ', '.join(receiving)}"
    plan = Plan(cells, axes, what, "layer_head" if senders == "heads" else "layer")
    return PatchingResult(plan, values, clean_value.cpu(), corrupt_value.cpu(), metric, direction, model.name, forwards)


def _receivers(model, receivers: str | Sequence[Receiver], layers: int) -> dict[str, tuple[str, tuple]]:
    """Receiver heads as {label: (hook name, index into its activation)}; empty for the logits."""
    if receivers == "logits":
        return {}
    if isinstance(receivers, str):
        raise InputError(f"receivers must be 'logits' or a list of (layer, head, 'q' | 'k' | 'v'), not {receivers!r}")
    found = {}
    for receiver in receivers:
        if not (isinstance(receiver, tuple) and len(receiver) == 3 and receiver[2] in ("q", "k", "v")):
            raise InputError(f"a receiver is (layer, head, 'q' | 'k' | 'v'), not {receiver!r}")
        layer, head, part = receiver
        if not 0 <= layer < layers:
            raise InputError(f"receiver layer {layer} is out of range: there are {layers} layers")
        name = f"blocks.{layer}.attn.hook_{part}"
        n_heads = model._points[name].heads.n_heads
        if not 0 <= head < n_heads:
            raise InputError(f"receiver head {head} is out of range: {name} has {n_heads} heads")
        found[f"{layer}.{head}{part}"] = (name, (slice(None), slice(None), head))
    return found


def _senders(model, senders: str, layers: int, trace) -> tuple[list[Cell], list[tuple[str, list[str]]]]:
    if senders == "mlps":
        cells = [Cell(f"blocks.{layer}.hook_mlp_out", layer, ()) for layer in range(layers)]
        return cells, [("layer", [str(layer) for layer in range(layers)])]
    n_heads = trace["blocks.0.attn.hook_z"].shape[2]
    cells = [Cell(f"blocks.{l}.attn.hook_z", l, (slice(None), slice(None), h)) for l in range(layers) for h in range(n_heads)]
    return cells, [("layer", [str(layer) for layer in range(layers)]), ("head", [str(h) for h in range(n_heads)])]


def _frozen_run(frozen: list[str], chunk: list[Cell], target, source, n_prompts: int) -> dict[str, torch.Tensor]:
    """Every head's and MLP's output from the target run, each cell's sender from the source run, in its rows."""
    replacements = {name: target[name].repeat(len(chunk), *[1] * (target[name].dim() - 1)) for name in frozen}
    for c, cell in enumerate(chunk):
        rows = replacements[cell.name][c * n_prompts : (c + 1) * n_prompts]
        rows[cell.index] = source[cell.name][cell.index]
    return replacements


def _taking(values: torch.Tensor, indices: list[tuple]) -> Callable:
    """An intervention writing the recorded receiver inputs at `indices` and leaving the rest to compute."""

    def take(activation: torch.Tensor, hook) -> None:
        for index in indices:
            activation[index] = values[index]

    return take


def _rows(model, length: int, budget: int) -> int:
    config = model._config
    d_model = getattr(config, "hidden_size", 768)
    vocab = getattr(config, "vocab_size", 50_000)
    return max(1, budget // (4 * length * (24 * d_model + vocab)))
