"""`extract`: run a dataset through a model and stream the activations at some hook points into an HDF5 store.

Each batch of context windows runs once (stopping after the last hook asked for); the rows of real tokens at the
selected positions go to a background writer, which commits them batch by batch (see `layout`). Re-running the
same call resumes after the last committed batch; under `torchrun` each process writes its own shard (`shards`).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError, StoreError
from ..inputs import pad_id, token_strings
from ..model import Model, Names, load
from . import layout
from .reader import ActivationStore
from .shards import join_shards, shard_of
from .sources import Source, Window, documents, windows
from .writer import Offload, Writer, WriterLock

StorePositions = Union[None, str, int, slice]


def extract(
    model: Any,
    inputs: Source,
    hooks: Names,
    path: str | os.PathLike,
    *,
    batch_size: int = 16,
    context_length: int | None = None,
    positions: StorePositions = None,
    dtype: torch.dtype = torch.float16,
    compression: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Store the activations of `model` at `hooks` for every token of `inputs` in the HDF5 file `path`.

    `model`: a `Model` or anything `neuronmap.load` takes. `inputs`: a list of strings, a text file (one document
    per line), a JSON-lines file (`text_field` of each record), a token tensor, or any iterable of strings or
    records (an HF `datasets` column). Documents longer than `context_length` (default: the model's context) run
    as consecutive windows of that length. `positions` keeps only some positions of each window (`"last"`, an int,
    a slice; default all); padding is never stored. Activations are cast to `dtype` (float16, bfloat16, float32)
    and optionally compressed (`"gzip"`, `"lzf"`).

    An interrupted extraction resumes when the same call runs again: it continues after the last committed batch
    (`overwrite=True` starts over). Under `torchrun`, each process extracts its share of the documents into its own
    shard and `path` joins them. Returns the store, open for reading.
    """
    model = load(model)
    if getattr(model.module, "config", None) is None:
        raise InputError(f"extract needs a Hugging Face model (with a config), not a {type(model.module).__name__}")
    names = model.resolve(hooks)
    path = _checked_path(path)
    _check_settings(batch_size, dtype, compression, positions)
    context = _context(model, context_length)
    docs = documents(inputs, text_field)
    shard = shard_of(docs.count)
    shapes = _feature_shapes(model, names)
    metadata = {
        "format": layout.FORMAT,
        "format_version": layout.FORMAT_VERSION,
        "neuronmap_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_name": model.name,
        "model": model_identity(model),
        "hooks": names,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "context_length": context,
        "positions": _positions_json(positions),
        "inputs": docs.description,
        "shard": shard.describe(),
        "arguments": {"batch_size": batch_size, "compression": compression, "text_field": text_field},
    }
    target = shard.path(path)
    with WriterLock(target):
        if overwrite:
            target.unlink(missing_ok=True)
        created = not target.exists()
        if created or not _finished(layout.existing(target, metadata), shard.count, target):
            file = layout.create(target, metadata, shapes, dtype, compression, _vocabulary(model)) if created else (
                layout.reopen(target))
            run = None
            try:
                run = _Extraction(model, names, file, target, dtype, positions, batch_size)
                documents_in = itertools.islice(docs.open(), shard.first, shard.stop)
                run.run(windows(documents_in, model.tokenizer, context, shard.first), shard.count, progress)
            except BaseException:
                nothing_committed = run is None or run.committed.documents == 0
                _close_after_failure(file)
                if created and nothing_committed:
                    target.unlink(missing_ok=True)  # a failure before the first batch leaves no file behind
                raise
            file.close()
    if shard.world > 1:
        join_shards(path, shard)
    return ActivationStore(path)


@dataclass
class _Batch:
    """One forward pass's worth of windows, padded on the right, with the rows it stores."""

    tokens: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # flat indices into [batch * pos] of the stored tokens
    columns: dict[str, np.ndarray]
    document_starts: np.ndarray
    windows: int


class _Extraction:
    """The extraction loop of one process: batches windows, runs them, and feeds the writer."""

    def __init__(self, model: Model, names: list[str], file: h5py.File, path: Path, dtype: torch.dtype,
                 positions: StorePositions, batch_size: int):
        self.model = model
        self.path = path
        self.names = names
        self.file = file
        self.dtype = dtype
        self.select = _selector(positions)
        self.batch_size = batch_size
        self.committed = layout.Progress.read(file)
        self.pad = pad_id(model.tokenizer)
        self.offload = Offload(model.device, slots=3)

    def run(self, stream: Iterator[Window], total_documents: int | None, show_progress: bool) -> None:
        self._verify_committed(itertools.islice(stream, self.committed.windows))
        rows = self.committed.rows
        bar = tqdm(total=total_documents, initial=self.committed.documents, unit="doc", disable=not show_progress,
                   desc="extracting", dynamic_ncols=True)
        writer = Writer(self._write, depth=2)
        start, tokens_done = time.perf_counter(), 0
        try:
            for group in _groups(stream, self.batch_size):
                batch = self._batch(group, rows)
                activations = self._activations(batch) if len(batch.rows) else {}
                host, ready, buffers = self.offload(activations)
                writer.submit((host, ready, buffers, batch.columns, batch.document_starts, batch.windows, False))
                rows += len(batch.rows)
                tokens_done += int(batch.mask.sum())
                bar.update(len(batch.document_starts))
                bar.set_postfix_str(f"{tokens_done / (time.perf_counter() - start):,.0f} tok/s, {rows:,} rows", refresh=False)
            empty = {column: np.zeros(0, dtype=kind) for column, kind in layout.ROW_COLUMNS.items()}
            writer.submit(({}, lambda: None, {}, empty, np.zeros(0, dtype=np.int64), 0, True))
        finally:
            bar.close()
            try:
                writer.close()
            except (OSError, RuntimeError) as error:
                committed = self.committed  # (the file is not read again: HDF5 may be unusable after a failed write)
                raise StoreError(
                    f"writing the store failed ({layout.first_line(error)}); it keeps the {committed.rows:,} rows of "
                    f"{committed.documents:,} documents committed before the failure and stays readable: free "
                    "space and run the same call again to resume"
                ) from error

    def _write(self, item: tuple) -> None:
        host, ready, buffers, columns, document_starts, n_windows, complete = item
        ready()
        arrays = {name: layout.to_storage(tensor) for name, tensor in host.items()}
        layout.check_space(self.file, self.path, arrays)
        self.committed = layout.append(self.file, self.committed, arrays, columns, document_starts, n_windows, complete)
        self.offload.release(buffers)

    def _activations(self, batch: _Batch) -> dict[str, torch.Tensor]:
        trace = self.model.run(batch.tokens, attention_mask=batch.mask, capture=self.names, capture_dtype=self.dtype,
                               stop_early=True)
        rows = batch.rows.to(self.model.device, non_blocking=True)
        return {name: trace[name].flatten(0, 1).index_select(0, rows) for name in self.names}

    def _batch(self, group: list[Window], first_row: int) -> _Batch:
        filled = [w for w in group if w.tokens]
        width = max((len(w.tokens) for w in filled), default=0)
        tokens = torch.full((len(filled), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(filled), width), dtype=torch.long)
        flat, columns, starts = [], {c: [] for c in layout.ROW_COLUMNS}, []
        row_in_batch, stored = 0, first_row
        for window in group:
            kept = np.asarray(self.select(len(window.tokens)), dtype=np.int64)
            if window.start == 0:
                starts.append(stored)
            if window.tokens:
                ids = np.asarray(window.tokens, dtype=np.int64)
                tokens[row_in_batch, : len(ids)] = torch.from_numpy(ids)
                mask[row_in_batch, : len(ids)] = 1
                flat.append(row_in_batch * width + kept)
                columns["tokens"].append(ids[kept])
                columns["document"].append(np.full(len(kept), window.document))
                columns["position"].append(window.start + kept)
                stored += len(kept)
                row_in_batch += 1
        rows = torch.from_numpy(np.concatenate(flat)) if flat else torch.zeros(0, dtype=torch.long)
        joined = {c: np.concatenate(v).astype(kind) if v else np.zeros(0, dtype=kind)
                  for (c, kind), v in zip(layout.ROW_COLUMNS.items(), columns.values())}
        return _Batch(tokens, mask, rows, joined, np.asarray(starts, dtype=np.int64), len(group))

    def _verify_committed(self, skipped: Iterable[Window]) -> None:
        """Check the windows a resumed run skips against the tokens already stored: other inputs are an error."""
        stored = self.file["tokens"]
        row = 0
        for group in _groups(skipped, 1024):
            expected = np.concatenate([np.asarray(w.tokens, dtype=np.int64)[np.asarray(self.select(len(w.tokens)), dtype=np.int64)]
                                       for w in group] or [np.zeros(0, dtype=np.int64)])
            found = stored[row : row + len(expected)]
            if len(found) != len(expected) or not np.array_equal(found, expected):
                raise StoreError(
                    f"the inputs differ from those this store was extracted from (from row {row:,} on, document "
                    f"{group[0].document}); pass overwrite=True to start over"
                )
            row += len(expected)
        if row != self.committed.rows:
            raise StoreError(
                f"the inputs hold fewer tokens than this store's {self.committed.rows:,} committed rows; pass "
                "overwrite=True to start over"
            )


def model_identity(model: Model) -> dict:
    """What makes two models the same for a store: their class, a hash of their config (paths and versions left out)
    and a hash of their weights' names, shapes, dtypes and a sample of their values."""
    config = model.module.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    weights = hashlib.sha256()
    for name, tensor in model.module.state_dict().items():
        sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 16)][:16].float().cpu().numpy()
        weights.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}:".encode() + sample.tobytes())
    return {
        "class": type(model.module).__name__,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def _finished(progress: layout.Progress, count: int | None, path: Path) -> bool:
    """Whether the store is complete; a complete one made from visibly other inputs is an error."""
    if progress.complete and count is not None and count != progress.documents:
        raise StoreError(
            f"{str(path)!r} holds a finished extraction of {progress.documents:,} documents and these inputs hold "
            f"{count:,}; pass overwrite=True (--overwrite) to replace it"
        )
    return progress.complete


def _feature_shapes(model: Model, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Each hook's per-token shape, from a one-token run; hooks without one row per token are refused here."""
    trace = model.run(torch.zeros((1, 1), dtype=torch.long), capture=names, stop_early=True)
    shapes = {}
    for name in names:
        activation = trace[name]
        if name.endswith(("hook_pattern", "hook_attn_scores")) or activation.shape[:2] != (1, 1):
            raise StoreError(
                f"{name!r} has no row per token (its shape depends on the batch's length): store per-token hooks "
                "such as 'blocks.*.hook_resid_post' or 'blocks.*.attn.hook_z'"
            )
        shapes[name] = tuple(activation.shape[2:])
    return shapes


def _groups(stream: Iterable[Window], size: int) -> Iterator[list[Window]]:
    """Windows in groups of `size` that hold tokens; empty documents ride along with the next group."""
    group, filled = [], 0
    for window in stream:
        group.append(window)
        filled += bool(window.tokens)
        if filled == size:
            yield group
            group, filled = [], 0
    if group:
        yield group


def _selector(positions: StorePositions):
    if positions is None or positions == "all":
        return range
    if positions == "last":
        return lambda n: range(n - 1, n) if n else range(0)
    if isinstance(positions, int):
        return lambda n: [positions % n] if -n <= positions < n else []
    return lambda n: range(n)[positions]


def _positions_json(positions: StorePositions) -> Any:
    if isinstance(positions, slice):
        return {"start": positions.start, "stop": positions.stop, "step": positions.step}
    return "all" if positions is None else positions


def _check_settings(batch_size: int, dtype: torch.dtype, compression: str | None, positions: StorePositions) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if dtype not in layout.STORAGE:
        raise InputError(f"dtype {dtype} cannot be stored; choose one of {', '.join(str(d) for d in layout.STORAGE)}")
    if compression not in (None, "gzip", "lzf"):
        raise InputError(f"compression {compression!r} is not one of None, 'gzip', 'lzf'")
    valid = positions is None or positions in ("all", "last") or isinstance(positions, slice) or (
        isinstance(positions, int) and not isinstance(positions, bool))
    if not valid or (isinstance(positions, slice) and positions.step == 0):
        raise InputError(f"positions must be None (all), 'last', an int or a slice, not {positions!r}")


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise StoreError(f"{str(path)!r} is a directory; give a file path such as {str(path / 'activations.h5')!r}")
    return path


def _context(model: Model, context_length: int | None) -> int:
    limit = model.context_length
    if context_length is None:
        if limit is None:
            raise InputError("the model does not state its context length: pass context_length=")
        return limit
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 1:
        raise InputError(f"context_length must be a positive int, got {context_length!r}")
    if limit is not None and context_length > limit:
        raise InputError(f"context_length {context_length} exceeds the model's context of {limit} tokens")
    return context_length


def _vocabulary(model: Model) -> list[str]:
    """Each token id's text, so the store can show its tokens without the model."""
    embeddings = model.module.get_input_embeddings()
    size = embeddings.num_embeddings
    tokenizer = model.tokenizer
    if tokenizer is None:
        return token_strings(None, range(size))
    known = min(size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    return texts + [""] * (size - known)


def _close_after_failure(file: h5py.File) -> None:
    """Close a store whose extraction failed; the failure itself is what the caller reports."""
    try:
        file.close()
    except (OSError, RuntimeError):
        pass


def _version() -> str:
    from .. import __version__

    return __version__
