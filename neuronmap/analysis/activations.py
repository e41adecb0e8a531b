"""The `[samples, features]` matrix an analysis reads, from whatever holds the activations.

A `Trace` gives one row per real token (padding left out) of a captured hook point; a tensor `[..., features]` or a
numpy array gives its rows as they are; an activation store (or one of its hooks) gives every stored row, read
whole (up to a memory limit), so methods that stream take the store itself instead (they say so).
`token_contexts` and `row_tokens` give each of those rows' token, in context or as an id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..trace import Trace

MAX_IN_MEMORY_BYTES = 2 << 30
"""The largest store hook `as_matrix` reads whole by default (as float64); larger ones need a streaming method."""

STREAMING_METHODS = (
    "neuron_statistics", "layer_summary", "neuron_entropy", "pca", "effective_dimensionality", "minibatch_cka",
    "train_tuned_lens",
)
"""The analyses that read a store block by block, whatever its size."""


def as_matrix(source: Any, hook: str | None = None, *, dtype: torch.dtype = torch.float64,
              max_bytes: int = MAX_IN_MEMORY_BYTES) -> torch.Tensor:
    """`source` as a finite `[samples, features]` tensor of `dtype` (on the CPU).

    `source`: a `Trace` with `hook` (one row per real token; a hook whose features are several dimensions, such as
    `attn.hook_z`'s heads, is flattened), a tensor or array `[..., features]`, or an `ActivationStore` with `hook`
    (or its `store[hook]` view), read whole only when it fits in `max_bytes` as `dtype`. NaN or infinite values are
    an error naming how many.
    """
    if isinstance(source, Trace):
        if hook is None:
            raise InputError(f"a trace holds several hook points ({', '.join(source.keys())}): pass hook=")
        values = source[hook]
        mask = source.attention_mask
        if mask is not None and values.dim() >= 2 and tuple(values.shape[:2]) == tuple(mask.shape):
            values = values[mask.bool().to(values.device)]
        else:
            values = values.flatten(0, min(1, values.dim() - 1)) if values.dim() > 1 else values[:, None]
        matrix = values.flatten(1)
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        matrix = torch.as_tensor(np.ascontiguousarray(source) if isinstance(source, np.ndarray) else source)
        if matrix.dim() == 0:
            raise InputError("activations must have a features dimension, got a scalar")
        matrix = matrix[:, None] if matrix.dim() == 1 else matrix.flatten(0, -2)
    elif hasattr(source, "hooks") and hasattr(source, "batches"):  # an ActivationStore
        if hook is None:
            hooks = list(source.hooks)
            if len(hooks) != 1:
                raise InputError(f"the store holds {len(hooks)} hooks ({', '.join(hooks)}): pass hook=")
            hook = hooks[0]
        matrix = _read_whole(source[hook], dtype, max_bytes)
    elif hasattr(source, "read") and hasattr(source, "__len__"):  # one hook of a store
        matrix = _read_whole(source, dtype, max_bytes)
    else:
        raise InputError(
            f"cannot read activations from a {type(source).__name__}: give a Trace with hook=, a tensor or array "
            "[samples, features], or an activation store"
        )
    matrix = matrix.detach().to(device="cpu", dtype=dtype)
    bad = int((~torch.isfinite(matrix)).sum())
    if bad:
        raise InputError(f"the activations hold {bad:,} NaN or infinite values; analyses need finite numbers")
    return matrix


def _read_whole(view: Any, dtype: torch.dtype, max_bytes: int) -> torch.Tensor:
    """All rows of a store's hook view, or an error naming the methods that stream when they would not fit."""
    features = int(np.prod(view.shape[1:], dtype=np.int64))
    needed = len(view) * features * torch.empty((), dtype=dtype).element_size()
    if needed > max_bytes:
        raise InputError(
            f"{view.hook!r} holds {len(view):,} rows × {features:,} features ({needed / 2**30:.1f} GiB as {dtype}), "
            f"more than max_bytes={max_bytes:,} for a method that reads everything at once; methods that stream a "
            f"store: {', '.join(STREAMING_METHODS)} (or analyse a slice, store[hook][:rows])"
        )
    return view[:].flatten(1)


def product_dtype(dtype: torch.dtype | None, sources: list[tuple[Any, str | None]]) -> torch.dtype:
    """The precision an analysis multiplies rows in: `dtype` when given (float32 or float64), else the data's own,
    float32 when every `(source, hook)` holds float32 or narrower (as captures and stores do), float64 otherwise.
    Means and sums stay float64 either way, so float32 products cost about 1e-7 relative, below the data's rounding."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"dtype must be torch.float32, torch.float64 or None (the data's own), got {dtype!r}")
        return dtype
    narrow = all(_held_dtype(source, hook).itemsize <= 4 for source, hook in sources)
    return torch.float32 if narrow else torch.float64


def _held_dtype(source: Any, hook: str | None) -> torch.dtype:
    """The dtype `source` holds its activations in, before `as_matrix` casts them (float64 when it cannot say)."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], str):
        source, hook = source
    if isinstance(source, Trace) and hook is not None and hook in source:
        return source[hook].dtype
    if isinstance(source, torch.Tensor):
        return source.dtype
    if isinstance(source, np.ndarray):
        return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(source.dtype, torch.float64)
    if hasattr(source, "hooks") and hasattr(source, "batches"):
        hooks = [hook] if hook is not None else list(source.hooks)
        return torch.float64 if len(hooks) != 1 or hooks[0] not in source else source[hooks[0]].dtype
    return getattr(source, "dtype", torch.float64) if hasattr(source, "read") else torch.float64


def row_tokens(source: Any, hook: str | None = None) -> torch.Tensor | None:
    """The token id behind each row of `as_matrix(source, hook)`, or None when the source does not say (a tensor,
    a store's bare hook view, or a trace captured at chosen positions)."""
    if isinstance(source, Trace):
        return source.tokens[source.attention_mask.bool()].cpu() if _one_row_per_token(source, hook) else None
    if hasattr(source, "tokens") and hasattr(source, "batches"):
        return source.tokens
    return None


def token_contexts(source: Any, hook: str | None = None, *, window: int = 4) -> Sequence[str] | None:
    """Each row of `as_matrix(source, hook)` as its token in context, "…up to `window` tokens[token]the next two…"
    (for hover text and cluster listings), or None when the source does not say which token a row is. A store's
    contexts are made when a row is read (views draw a few thousand of millions)."""
    if isinstance(source, Trace):
        if not _one_row_per_token(source, hook):
            return None
        return [_context(tokens, i, window) for tokens in source.str_tokens for i in range(len(tokens))]
    if hasattr(source, "tokens") and hasattr(source, "batches"):
        return _StoreContexts(source, window)
    return None


class _StoreContexts(Sequence):
    """A store's rows as tokens in context, each made from the store's tokens and document offsets when read."""

    def __init__(self, store: Any, window: int):
        self._vocabulary, self._ids = store.vocabulary, store.tokens.numpy()
        self._starts, self._window = store.documents.numpy(), window

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, row: Any) -> Any:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = range(len(self))[int(row)]  # negative rows count from the end; out of range raises IndexError
        document = int(np.searchsorted(self._starts, row, side="right")) - 1
        start, stop = int(self._starts[document]), int(self._starts[document + 1])
        first, last = max(start, row - self._window), min(stop, row + 3)
        tokens = [self._vocabulary[int(i)] for i in self._ids[first:last]]
        return _context(tokens, row - first, self._window, before=first > start, after=last < stop)


def _one_row_per_token(trace: Trace, hook: str | None) -> bool:
    """Whether `as_matrix` gives one row per real token of `trace` at `hook` (not when positions were chosen)."""
    if hook is None:
        raise InputError(f"a trace holds several hook points ({', '.join(trace.keys())}): pass hook=")
    mask = trace.attention_mask
    values = trace[hook]
    return mask is not None and values.dim() >= 2 and tuple(values.shape[:2]) == tuple(mask.shape)


def _context(tokens: list[str], i: int, window: int, *, before: bool | None = None, after: bool | None = None) -> str:
    """Token `i` of `tokens` in brackets with up to `window` tokens before it and two after, "…" where the text goes
    on (`before`/`after` say so when `tokens` is itself a cut of the text)."""
    left = "".join(tokens[max(0, i - window) : i])
    right = "".join(tokens[i + 1 : i + 3])
    before = i > window if before is None else before
    after = i + 3 < len(tokens) if after is None else after
    return f"{'…' if before else ''}{left}[{tokens[i]}]{right}{'…' if after else ''}"
