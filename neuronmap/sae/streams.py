"""Where an SAE's training activations come from, as an endless stream of `[batch_size, d_in]` batches on the
training device: a model's hook point (forward passes refilling a shuffled buffer), an activation store (its own
shuffled minibatches), or a tensor of activations (reshuffled every pass).

Inputs and stores that run out before training has its tokens are read again from the start (with a warning); the
number of passes is kept in the SAE's metadata.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, SAEError
from ..inputs import pad_id
from ..model import Model, load

_CONTEXT = 128  # tokens per window by default (SAELens's context_size default)


@dataclass
class Activations:
    """A training stream: `batches` never ends (its first batch is already read, to learn `d_in`); `description`
    says what the data was (JSON, for the SAE's metadata); `passes()` how many times it has been started."""

    batches: Iterator[torch.Tensor]
    d_in: int
    hook_name: str | None
    model_name: str | None
    reshape: str  # "hook_z" when [heads, d_head] activations were flattened
    description: dict[str, Any]
    passes: Callable[[], int] = field(default=lambda: 1)  # how many times the data has been started so far


def open_stream(source: Any, hook_name: str | None, inputs: Any, *, batch_size: int, tokens: int, seed: int,
                device: torch.device, dtype: torch.dtype, context_length: int | None, model_batch_size: int,
                buffer_tokens: int | None) -> Activations:
    """Recognise `source` and start its stream: a tensor of activations `[rows, d_in]`, an `ActivationStore` (or the
    path of one), or a `Model` (or anything `neuronmap.load` takes) with `hook_name` and `inputs`."""
    from ..store.reader import ActivationStore

    if isinstance(source, torch.Tensor):
        if inputs is not None:
            raise InputError("a tensor of activations is the data itself: pass no inputs")
        return _tensor_stream(source, hook_name, batch_size, seed, device, dtype)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        if inputs is not None:
            raise InputError("an activation store holds its own data: pass no inputs")
        return _store_stream(source, hook_name, batch_size, tokens, seed, device, dtype)
    model = source if isinstance(source, Model) else load(source)
    if hook_name is None:
        raise InputError("training from a model needs the hook to read: pass hook_name (e.g. 'blocks.0.hook_resid_post')")
    if inputs is None:
        raise InputError("training from a model needs inputs: a list of strings, a text file, or token ids")
    return _model_stream(model, hook_name, inputs, batch_size, tokens, seed, device, dtype, context_length,
                         model_batch_size, buffer_tokens)


# --- a model's hook point --------------------------------------------------------------------------------------------


def _model_stream(model: Model, hook_name: str, inputs: Any, batch_size: int, tokens: int, seed: int,
                  device: torch.device, dtype: torch.dtype, context_length: int | None, model_batch_size: int,
                  buffer_tokens: int | None) -> Activations:
    from ..store.sources import token_batches

    names = model.resolve(hook_name)
    if len(names) != 1:
        raise SAEError(f"an SAE reads one hook point, and {hook_name!r} matches {len(names)}: {', '.join(names[:5])}")
    hook = names[0]
    context = _context(model, context_length)
    _positive("model_batch_size", model_batch_size)
    pad = pad_id(model.tokenizer)
    passes = [0]

    def rows() -> Iterator[torch.Tensor]:
        while True:
            passes[0] += 1
            read = 0
            for batch in token_batches(inputs, model.tokenizer, pad, context, model_batch_size):
                trace = model.run(batch.tokens, attention_mask=batch.mask, capture=hook, stop_early=True)
                activation = trace[hook]
                if activation.shape[:2] != batch.mask.shape:
                    raise SAEError(f"{hook!r} has no vector per token (shape {list(activation.shape)}): train SAEs on "
                                   "hooks such as 'blocks.0.hook_resid_post', 'blocks.0.hook_mlp_out' or 'blocks.0.attn.hook_z'")
                real = activation[batch.mask.bool().to(activation.device)]
                read += real.shape[0]
                yield _flat(real, hook).to(device=device, dtype=dtype, non_blocking=True)
            if read == 0:
                raise InputError("the inputs hold no tokens" if passes[0] == 1 else
                                 "the inputs ran out and cannot be read again (an iterator): give a list, a file or "
                                 "token ids, or ask for fewer tokens")
            if passes[0] == 1:
                warnings.warn(f"the inputs hold {read:,} tokens, fewer than the {tokens:,} to train on: reading them "
                              "again from the start", stacklevel=2)

    capacity = buffer_tokens if buffer_tokens is not None else min(16 * batch_size, max(2 * batch_size, tokens))
    _positive("buffer_tokens", capacity)
    if capacity < batch_size:
        raise InputError(f"buffer_tokens={capacity} is smaller than batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    batches, d_in = _peeked(_shuffled(rows(), batch_size, capacity, generator))
    description = {"source": "model", "context_size": context, "model_batch_size": model_batch_size,
                   "buffer_tokens": capacity}
    return Activations(batches, d_in, hook, model.name, _reshape(hook), description, lambda: passes[0])


def _shuffled(rows: Iterator[torch.Tensor], batch_size: int, capacity: int,
              generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A mixing buffer: fill to `capacity` rows, shuffle, serve half of it as batches, keep the other half, refill.
    Keeping half mixes tokens of documents read far apart (a fill alone would hold only neighbouring documents)."""
    kept: torch.Tensor | None = None
    while True:
        parts, held = ([kept], len(kept)) if kept is not None else ([], 0)
        while held < capacity:
            part = next(rows)
            parts.append(part)
            held += len(part)
        buffer = torch.cat(parts)
        buffer = buffer[torch.randperm(len(buffer), generator=generator).to(buffer.device)]
        served = max(batch_size, (len(buffer) // 2) // batch_size * batch_size)
        for start in range(0, served, batch_size):
            yield buffer[start : start + batch_size]
        kept = buffer[served:]


def _context(model: Model, context_length: int | None) -> int:
    limit = model.context_length
    if context_length is None:
        return min(_CONTEXT, limit) if limit else _CONTEXT
    _positive("context_length", context_length)
    if limit is not None and context_length > limit:
        raise InputError(f"context_length {context_length} exceeds the model's context of {limit} tokens")
    return context_length


# --- an activation store ---------------------------------------------------------------------------------------------


def _store_stream(store: Any, hook_name: str | None, batch_size: int, tokens: int, seed: int, device: torch.device,
                  dtype: torch.dtype) -> Activations:
    if hook_name is None:
        if len(store.hooks) != 1:
            raise InputError(f"the store holds {len(store.hooks)} hooks ({', '.join(store.hooks)}): pass hook_name")
        hook_name = store.hooks[0]
    store[hook_name]  # a hook the store lacks: HookNameError naming the ones it has
    if len(store) < batch_size:
        raise SAEError(f"the store holds {len(store):,} rows, fewer than one batch of {batch_size:,}: lower batch_size")
    if tokens > len(store):
        warnings.warn(f"the store holds {len(store):,} tokens, fewer than the {tokens:,} to train on: reading them "
                      "again in a new order", stacklevel=2)
    served = [0]

    def batches() -> Iterator[torch.Tensor]:
        for batch in store.batches(hook_name, batch_size, shuffle=True, seed=seed, epochs=None, drop_last=True,
                                   dtype=dtype, device=device):
            served[0] += len(batch)
            yield _flat(batch, hook_name)

    stream, d_in = _peeked(batches())
    description = {"source": "store", "store": str(store.path), "store_rows": len(store)}
    context = store.metadata.get("context_length")
    if context is not None:
        description["context_size"] = context
    return Activations(stream, d_in, hook_name, store.model_name, _reshape(hook_name), description,
                       lambda: 1 + max(0, served[0] - 1) // len(store))


# --- a tensor of activations -----------------------------------------------------------------------------------------


def _tensor_stream(x: torch.Tensor, hook_name: str | None, batch_size: int, seed: int, device: torch.device,
                   dtype: torch.dtype) -> Activations:
    if not x.dtype.is_floating_point or x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"activations must be a non-empty float tensor [rows, d_in], got {x.dtype} {list(x.shape)}")
    x = x.flatten(1)
    if x.shape[0] < batch_size:
        raise SAEError(f"the activations hold {x.shape[0]:,} rows, fewer than one batch of {batch_size:,}: lower batch_size")
    generator = torch.Generator().manual_seed(seed)
    passes = [0]

    def batches() -> Iterator[torch.Tensor]:
        while True:
            passes[0] += 1
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            for start in range(0, x.shape[0] - batch_size + 1, batch_size):
                yield x[order[start : start + batch_size]].to(device=device, dtype=dtype, non_blocking=True)

    stream, d_in = _peeked(batches())
    return Activations(stream, d_in, hook_name, None, "none", {"source": "tensor", "rows": x.shape[0]}, lambda: passes[0])


# --- shared ----------------------------------------------------------------------------------------------------------


def _flat(rows: torch.Tensor, hook: str) -> torch.Tensor:
    """One vector per token: `[rows, heads, d_head]` (attention's `hook_z`) flattened to `[rows, heads × d_head]`."""
    if rows.dim() == 2:
        return rows
    if rows.dim() == 3 and hook.endswith("hook_z"):
        return rows.flatten(1)
    raise SAEError(f"{hook!r} has activations of shape {list(rows.shape[1:])} per token; an SAE reads one vector "
                   "per token (hook_resid_*, hook_*_out, mlp.hook_post, attn.hook_z)")


def _reshape(hook: str | None) -> str:
    return "hook_z" if hook is not None and hook.endswith("hook_z") else "none"


def _peeked(batches: Iterator[torch.Tensor]) -> tuple[Iterator[torch.Tensor], int]:
    """The stream with its first batch read (which raises here, before training, if the source is unusable)."""
    first = next(batches)
    return itertools.chain([first], batches), first.shape[-1]


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
