"""Reading activations block by block, for the analyses that stream a store (memory holds one block, whatever the
number of rows), the covariance accumulated over those blocks, and the per-row label check every analysis shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .activations import as_matrix


def store_view(source: Any, hook: str | None) -> Any:
    """The store hook view to stream for `source` (a store with `hook`, or a hook view), or None for anything else
    (a trace, tensor or array, which `as_matrix` reads whole)."""
    if hasattr(source, "hooks") and hasattr(source, "batches"):
        if hook is None:
            if len(source.hooks) != 1:
                raise InputError(f"the store holds {len(source.hooks)} hooks ({', '.join(source.hooks)}): pass hook=")
            hook = source.hooks[0]
        return source[hook]
    if hasattr(source, "read") and hasattr(source, "to_torch") and hasattr(source, "__len__"):
        return source
    return None


def row_blocks(source: Any, hook: str | None, batch_size: int, *, dtype: torch.dtype = torch.float64,
               reuse: bool = False) -> Iterator[torch.Tensor]:
    """The rows of `source` as `[rows, features]` blocks of `dtype`: a store (with `hook`) or hook view read from disk
    `batch_size` rows at a time, anything else (see `as_matrix`) as one block. With `reuse`, every block is read into
    one buffer, valid until the next block is read. A block holding NaN or inf is an error naming its rows."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    view = store_view(source, hook)
    if view is None:
        yield as_matrix(source, hook, dtype=dtype)
        return
    n = len(view)
    buffer = torch.empty(min(batch_size, n), features_of(view), dtype=dtype) if reuse else None
    for start in range(0, n, batch_size):
        array = view.read(start, min(start + batch_size, n))
        block = buffer[: len(array)] if reuse else torch.empty(len(array), features_of(view), dtype=dtype)
        block.copy_(view.to_torch(array).flatten(1))  # torch widens float16 tens of times faster than numpy
        if not bool(torch.isfinite(torch.mv(block.T, torch.ones(len(block), dtype=dtype))).all()):
            bad = int((~torch.isfinite(block)).sum())  # NaN or inf anywhere reaches its column's sum
            raise InputError(f"rows {start:,} to {start + len(block):,} of {view.hook!r} hold {bad:,} NaN or infinite "
                             "values; analyses need finite numbers")
        yield block


def features_of(view: Any) -> int:
    """Features per row of a store's hook view (all dimensions after the first, flattened)."""
    return int(np.prod(view.shape[1:], dtype=np.int64))


def source_name(source: Any, hook: str | None) -> str:
    """What to call the activations in a result: the hook, a store view's hook, or "activations"."""
    return hook if hook is not None else str(getattr(source, "hook", "")) or "activations"


class Covariance:
    """The mean and covariance of rows added block by block, in float64 whatever the blocks' dtype.

    Each block is shifted by the first block's mean (which keeps the sums from cancelling when the mean is large)
    and only the panels of `BᵀB` on and above the diagonal are multiplied (5/8 of the work for 4 panels), then
    mirrored, so memory holds the `[features × features]` sums and nothing that grows with the rows."""

    def __init__(self, features: int):
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._total = torch.zeros(features, dtype=torch.float64)
        self._upper = torch.zeros(features, features, dtype=torch.float64)
        self._edges = np.linspace(0, features, min(8, max(1, features // 192)) + 1).astype(int).tolist()

    def add(self, block: torch.Tensor, *, overwrite: bool = False) -> None:
        """Count the rows of `block` `[rows, features]` (with `overwrite`, shifting it in place saves a copy)."""
        if not len(block):
            return
        if self._shift is None:
            self._shift = block.mean(0)
        centred = block.sub_(self._shift) if overwrite else block - self._shift
        self._total += torch.mv(centred.T, torch.ones(len(block), dtype=block.dtype))
        for a, b in zip(self._edges[:-1], self._edges[1:]):
            self._upper[a:b, a:] += centred[:, a:b].T @ centred[:, a:]
        self.n += len(block)

    @property
    def mean(self) -> torch.Tensor:
        return self._shift.double() + self._total / self.n

    @property
    def comoment(self) -> torch.Tensor:
        """`Σ (x - mean)(x - mean)ᵀ` over every row added."""
        offset = self._total / self.n
        return self._upper.triu() + self._upper.triu(1).T - self.n * torch.outer(offset, offset)

    @property
    def covariance(self) -> torch.Tensor:
        """The (n - 1)-normalised covariance."""
        return self.comoment / (self.n - 1)


def labels_array(labels: Any, rows: int, what: str = "label") -> np.ndarray:
    """`labels` as a 1-D numpy array of one `what` per row, or an error saying how many are needed."""
    values = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if values.ndim != 1:
        raise InputError(f"labels must be one {what} per row (1-D), got shape {list(values.shape)}")
    if len(values) != rows:
        raise InputError(f"{len(values):,} labels for {rows:,} rows of activations: give one {what} per row")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"the labels hold {int((~np.isfinite(values)).sum())} NaN or infinite values")
    return values
