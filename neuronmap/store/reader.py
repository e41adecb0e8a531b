"""Reading a store back: lazy per-hook views that read only the rows asked for, the tokens behind each row, and
shuffled minibatches for training that keep reads sequential (whole chunks into a shuffle buffer)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import h5py
import numpy as np
import torch

from ..display import Renders, format_bytes, html_table
from ..errors import HookNameError, InputError, StoreError
from . import layout
from .writer import WriterLock

Rows = Union[int, slice, Sequence[int], np.ndarray, torch.Tensor]


class HookView:
    """One hook's activations in a store, `[rows, *features]`, read lazily: indexing reads only those rows from
    disk and returns a torch tensor (`view[1000:2000]`, `view[[5, 3, 9]]`, `view[-1]`, `view[:, 7]`)."""

    def __init__(self, dataset: h5py.Dataset, rows: int, hook: str):
        self.dataset = dataset
        self.hook = hook
        self.shape = (rows, *dataset.shape[1:])
        self.dtype = getattr(torch, dataset.attrs.get("dtype", str(dataset.dtype)))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"HookView({self.hook!r}, shape {list(self.shape)}, {str(self.dtype).removeprefix('torch.')})"

    @property
    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk: the unit in which the store is read from disk."""
        return self.dataset.chunks[0] if self.dataset.chunks else self.shape[0]

    def __getitem__(self, index: Rows | tuple) -> torch.Tensor:
        if not isinstance(index, tuple):
            return self._rows(index)
        rows, rest = index[0], index[1:]
        tensor = self._rows(rows)
        return tensor[rest] if isinstance(rows, (int, np.integer)) else tensor[(slice(None), *rest)]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows `start` to `stop` as stored (numpy; bfloat16 as its uint16 bits): one sequential read."""
        return self.dataset[start:stop]

    def to_torch(self, array: np.ndarray) -> torch.Tensor:
        return layout.from_storage(array, self.dtype)

    def _rows(self, index: Rows) -> torch.Tensor:
        n = self.shape[0]
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            if not -n <= index < n:
                raise IndexError(f"row {index} is out of range for {n:,} rows")
            return self.to_torch(self.read(index % n, index % n + 1))[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self.to_torch(self.read(start, max(start, stop)))
            return self._rows(np.arange(start, stop, step))
        wanted = _row_array(index, n)
        unique, inverse = np.unique(wanted, return_inverse=True)
        if len(unique) == 0:
            return self.to_torch(self.read(0, 0))
        span = unique[-1] - unique[0] + 1
        if span <= 4 * len(unique):  # dense enough: one sequential read beats a scattered selection
            block = self.read(int(unique[0]), int(unique[-1]) + 1)[unique - unique[0]]
        else:
            block = self.dataset[unique]
        return self.to_torch(np.ascontiguousarray(block[inverse]))


class ActivationStore(Renders):
    """An activation store written by `neuronmap.extract`, opened read-only.

    `store["blocks.3.hook_resid_post"]` is a lazy `HookView`; `store.tokens` the token id of every row;
    `store.documents` the row offsets of each document (document `d` is rows `documents[d]:documents[d + 1]`);
    `store.str_tokens(rows)` and `store.locate(rows)` say which token each row is; `store.batches(...)` yields
    shuffled minibatches for training. A store whose extraction is still running or was interrupted opens too
    and shows its committed rows (`refresh()` picks up rows committed since).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file, self._unfinished_writer = layout.open_for_reading(self.path)
        try:
            self.metadata = layout.read_metadata(self._file, self.path)
            missing = [s for s in self.metadata.get("shards", []) if not (self.path.parent / s).is_file()]
            if missing:  # HDF5 would read a missing shard's rows as zeros
                raise StoreError(f"{self.path.name!r} joins shards that are missing: {', '.join(missing)}")
        except StoreError:
            self._file.close()
            raise
        self.progress = layout.Progress.read(self._file)

    def refresh(self) -> None:
        """Pick up batches committed since the store was opened (while an extraction is writing it)."""
        if self._unfinished_writer:
            self._file[layout.PROGRESS].refresh()
            for name in (*(f"{layout.ACTIVATIONS}/{h}" for h in self.hooks), *layout.ROW_COLUMNS, layout.DOCUMENT_STARTS):
                self._file[name].refresh()
        self.progress = layout.Progress.read(self._file)
        self.__dict__.pop("tokens", None)
        self.__dict__.pop("documents", None)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hooks(self) -> list[str]:
        return list(self.metadata["hooks"])

    @property
    def model_name(self) -> str:
        return self.metadata.get("model_name", "?")

    @property
    def status(self) -> str:
        """"complete", "being written" (an extraction is running) or "interrupted" (run the same call to resume)."""
        if self.progress.complete:
            return "complete"
        return "being written" if WriterLock.held(self.path) or self._shards_held() else "interrupted"

    def __len__(self) -> int:
        return self.progress.rows

    def __contains__(self, hook: object) -> bool:
        return hook in self.metadata["hooks"]

    def __getitem__(self, hook: str) -> HookView:
        if hook not in self.metadata["hooks"]:
            raise HookNameError(hook, self.hooks) if isinstance(hook, str) else TypeError("index a store by hook name")
        return HookView(self._file[layout.ACTIVATIONS][hook], self.progress.rows, hook)

    @functools.cached_property
    def tokens(self) -> torch.Tensor:
        """The token id of every row, `[rows]`."""
        return torch.from_numpy(self._file["tokens"][: self.progress.rows].astype(np.int64))

    @functools.cached_property
    def documents(self) -> torch.Tensor:
        """Row offsets per document, `[documents + 1]`: document `d`'s rows are `documents[d]:documents[d + 1]`."""
        starts = self._file[layout.DOCUMENT_STARTS][: self.progress.documents]
        return torch.from_numpy(np.append(starts, self.progress.rows).astype(np.int64))

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """Each token id's text, as the model's tokenizer decodes it alone."""
        return list(self._file[layout.VOCAB].asstr()[:])

    def str_tokens(self, rows: Rows) -> str | list[str]:
        """The text of the token at each row (one string for one row)."""
        ids = self._column("tokens", rows)
        vocabulary = self.vocabulary
        return vocabulary[int(ids)] if ids.ndim == 0 else [vocabulary[int(i)] for i in ids]

    def locate(self, rows: Rows) -> tuple[int, int, str] | list[tuple[int, int, str]]:
        """`(document, position in the document, token text)` of each row (one tuple for one row)."""
        documents, positions = self._column("document", rows), self._column("position", rows)
        tokens = self.str_tokens(rows)
        if documents.ndim == 0:
            return int(documents), int(positions), tokens
        return [(int(d), int(p), t) for d, p, t in zip(documents, positions, tokens)]

    def batches(
        self,
        hooks: str | Sequence[str] | None = None,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        buffer_rows: int | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        with_rows: bool = False,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]]:
        """Minibatches of rows: a tensor `[batch_size, *features]` for one hook, a dict by hook for several (the
        same rows in each); with `with_rows`, `(row indices, batch)` pairs, so each row can be traced to its token.

        Shuffled, every row comes exactly once per epoch: whole chunks are read in a random order into a buffer of
        about `buffer_rows` rows (default: 16 batches, at most 256 MiB), whose rows are shuffled and served, so the
        disk is read sequentially. The same `seed` gives the same batches. `epochs=None` repeats forever.
        """
        names = [hooks] if isinstance(hooks, str) else list(hooks) if hooks is not None else self.hooks
        views = [self[name] for name in names]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(self) == 0:
            raise StoreError(f"{self.path.name!r} has no committed rows yet")
        block = max(view.chunk_rows for view in views)
        row_bytes = sum(int(np.prod(v.shape[1:], dtype=np.int64)) * v.dataset.dtype.itemsize for v in views)
        if buffer_rows is None:
            buffer_rows = max(batch_size, min(16 * batch_size, (256 << 20) // max(1, row_bytes)))
        blocks_per_fill = max(1, -(-buffer_rows // block))
        readers = [lambda a, b: np.arange(a, b)] + [view.read for view in views]
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            for rows, *arrays in self._epoch(readers, block, blocks_per_fill, batch_size, rng if shuffle else None,
                                             drop_last):
                tensors = {v.hook: _moved(v.to_torch(a), dtype, device) for v, a in zip(views, arrays)}
                batch = tensors[names[0]] if isinstance(hooks, str) else tensors
                yield (torch.from_numpy(rows), batch) if with_rows else batch
            epoch += 1

    def _epoch(self, readers: list, block: int, blocks_per_fill: int, batch_size: int, rng: np.random.Generator | None,
               drop_last: bool) -> Iterator[list[np.ndarray]]:
        n = len(self)
        order = np.arange(-(-n // block))
        if rng is not None:
            order = rng.permutation(order)
        carry = [read(0, 0) for read in readers]
        for fill in range(0, len(order), blocks_per_fill):
            spans = [(int(b) * block, min(n, (int(b) + 1) * block)) for b in order[fill : fill + blocks_per_fill]]
            buffer = [np.concatenate([c] + [read(a, b) for a, b in spans]) for read, c in zip(readers, carry)]
            if rng is not None:
                shuffled = rng.permutation(len(buffer[0]))
                buffer = [array[shuffled] for array in buffer]
            served = len(buffer[0]) - len(buffer[0]) % batch_size
            for start in range(0, served, batch_size):
                yield [array[start : start + batch_size] for array in buffer]
            carry = [array[served:] for array in buffer]
        if len(carry[0]) and not drop_last:
            yield carry

    def _column(self, name: str, rows: Rows) -> np.ndarray:
        return HookView(self._file[name], len(self), name)[rows].numpy()

    def _shards_held(self) -> bool:
        return any(WriterLock.held(self.path.parent / shard) for shard in self.metadata.get("shards", []))

    @property
    def nbytes_on_disk(self) -> int:
        return sum(_storage_size(self._file[layout.ACTIVATIONS][hook], self.path.parent) for hook in self.hooks)

    def __repr__(self) -> str:
        status = "" if self.progress.complete else f", {self.status}"
        return (
            f"ActivationStore({self.path.name!r}, model {self.model_name!r}, {len(self.hooks)} hooks, {len(self):,} tokens, "
            f"{self.progress.documents:,} documents, {self.metadata['dtype']}, "
            f"{format_bytes(self.nbytes_on_disk)} on disk{status})"
        )

    def _repr_html_(self) -> str:
        group = self._file[layout.ACTIVATIONS]
        rows = []
        for hook in self.hooks:
            dataset = group[hook]
            size = _storage_size(dataset, self.path.parent)
            raw = len(self) * int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
            rows.append((hook, "×".join(map(str, (len(self), *dataset.shape[1:]))), self.metadata["dtype"],
                         format_bytes(size), f"{raw / size:.2f}" if size else "-"))
        shards = len(self.metadata.get("shards", [])) or 1
        caption = (
            f"Activation store {self.path.name}: model {self.model_name}, {len(self):,} tokens in "
            f"{self.progress.documents:,} documents, context {self.metadata['context_length']}, "
            f"{format_bytes(self.nbytes_on_disk)} on disk" + (f", {shards} shards" if shards > 1 else "")
            + ("" if self.progress.complete else f" ({self.status})")
        )
        return html_table(caption, ("hook", "shape", "dtype", "on disk", "compression ratio"), rows, numeric=(3, 4))


def _row_array(rows: Rows, n: int) -> np.ndarray:
    array = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if array.dtype == bool or array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise IndexError(f"rows must be an int, a slice or a 1-d sequence of ints, not {type(rows).__name__}")
    if array.size and (array.min() < -n or array.max() >= n):
        raise IndexError(f"rows {array.min()}..{array.max()} are out of range for {n:,} rows")
    return array % n if n else array


def _moved(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    return tensor.to(device=device or tensor.device, dtype=dtype or tensor.dtype) if dtype or device else tensor


def _storage_size(dataset: h5py.Dataset, root: Path) -> int:
    """Bytes the dataset takes on disk; for a joined store, the sum over the shard files it reads from."""
    if not dataset.is_virtual:
        return dataset.id.get_storage_size()
    total = 0
    for source in dataset.virtual_sources():
        with h5py.File(root / source.file_name, "r") as shard:
            total += shard[source.dset_name].id.get_storage_size()
    return total
