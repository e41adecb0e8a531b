"""The store's HDF5 file: its layout, its metadata, the commit protocol, and reopening one to resume.

Layout: `activations/<hook>` is `[rows, *features]`, one row per stored token, chunked along rows; `tokens`,
`document` and `position` say which token each row is; `document_starts[d]` is document `d`'s first row;
`vocab[i]` is token `i`'s text; the root attribute `neuronmap` holds the metadata as JSON.

Commit protocol: the file is written in HDF5's single-writer/multiple-reader (SWMR) mode, whose ordered metadata
writes keep the file consistent at every instant. A batch is appended, flushed, and only then counted in the
`progress` dataset (`rows, windows, documents, complete`), flushed again. Readers see `progress` rows and nothing
past them, so a killed writer leaves a file whose committed rows are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import StoreError

FORMAT = "neuronmap-activation-store"
FORMAT_VERSION = 1
METADATA = "neuronmap"
ACTIVATIONS = "activations"
PROGRESS = "progress"
DOCUMENT_STARTS = "document_starts"
VOCAB = "vocab"
ROW_COLUMNS = {"tokens": np.int32, "document": np.int64, "position": np.int32}
STORAGE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "uint16"}
"""Torch dtype -> HDF5 storage type. bfloat16 has no HDF5 or numpy type: its bits are stored as uint16."""
MUST_MATCH = ("model", "hooks", "dtype", "context_length", "positions", "shard", "shards")
"""Metadata keys a resumed extraction must share with the store it continues. (The inputs are checked by content:
a resumed run compares the documents it skips with the tokens stored.)"""
_CHUNK_BYTES = 1 << 20


@dataclass
class Progress:
    """How much of an extraction is committed: rows written, windows run, documents started, and whether all of
    the inputs are in."""

    rows: int = 0
    windows: int = 0
    documents: int = 0
    complete: bool = False

    @classmethod
    def read(cls, file: h5py.File) -> Progress:
        rows, windows, documents, complete = (int(v) for v in file[PROGRESS][:])
        return cls(rows, windows, documents, bool(complete))

    def array(self) -> np.ndarray:
        return np.array([self.rows, self.windows, self.documents, int(self.complete)], dtype=np.int64)


def chunk_rows(features: Sequence[int], itemsize: int) -> int:
    """Rows per chunk: the power of two nearest to 1 MiB chunks, so a chunk is one sequential read."""
    row_bytes = max(1, int(np.prod(features, dtype=np.int64)) * itemsize)
    rows = 1 << max(0, round(np.log2(max(1.0, _CHUNK_BYTES / row_bytes))))
    return int(min(max(rows, 16), 1 << 16))


def read_metadata(file: h5py.File, path: os.PathLike | str) -> dict:
    """The store's metadata, or a `StoreError` saying the file is HDF5 but not a NeuronMap store."""
    raw = file.attrs.get(METADATA)
    try:
        metadata = json.loads(raw) if raw is not None else None
    except (TypeError, ValueError):
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or PROGRESS not in file:
        raise StoreError(f"{os.fspath(path)!r} is an HDF5 file but not a NeuronMap activation store")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"{os.fspath(path)!r} is a version {metadata['format_version']} store; this NeuronMap reads version "
            f"{FORMAT_VERSION}: upgrade neuronmap"
        )
    return metadata


def open_for_reading(path: os.PathLike | str) -> tuple[h5py.File, bool]:
    """Open a store read-only; the flag says whether its writer is still running or was killed (the file is
    then opened in SWMR-read mode, which HDF5 allows on such a file; readers see committed rows only)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no activation store at {str(path)!r}")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{str(path)!r} is not an HDF5 file (an activation store is one)")
    try:
        return h5py.File(path, "r"), False
    except OSError as error:
        if not _open_for_write(error):
            raise StoreError(f"cannot open {str(path)!r}: {first_line(error)}") from None
    return h5py.File(path, "r", swmr=True), True


def create(path: Path, metadata: dict, shapes: Mapping[str, Sequence[int]], dtype: torch.dtype,
           compression: str | None, vocab: Sequence[str]) -> h5py.File:
    """A new, empty store at `path`, built under a temporary name and renamed into place, already in SWMR mode."""
    partial = path.with_name(path.name + ".partial")
    file = h5py.File(partial, "w", libver="latest")
    try:
        file.attrs[METADATA] = json.dumps(metadata)
        storage = STORAGE[dtype]
        group = file.create_group(ACTIVATIONS)
        for hook, features in shapes.items():
            rows = chunk_rows(features, np.dtype(storage).itemsize)
            group.create_dataset(
                hook, shape=(0, *features), maxshape=(None, *features), chunks=(rows, *features), dtype=storage,
                compression=compression, shuffle=compression is not None,
            ).attrs["dtype"] = str(dtype).removeprefix("torch.")
        for column, kind in ROW_COLUMNS.items():
            file.create_dataset(column, shape=(0,), maxshape=(None,), chunks=(1 << 16,), dtype=kind)
        file.create_dataset(DOCUMENT_STARTS, shape=(0,), maxshape=(None,), chunks=(1 << 14,), dtype=np.int64)
        file.create_dataset(VOCAB, data=np.array(vocab, dtype=object), dtype=h5py.string_dtype())
        file.create_dataset(PROGRESS, data=Progress().array())
        file.flush()
        os.replace(partial, path)
        file.swmr_mode = True
    except BaseException:
        file.close()
        partial.unlink(missing_ok=True)
        raise
    return file


def existing(path: Path, metadata: dict) -> Progress:
    """How far the store at `path` got, once it is checked to be a store of the same extraction as `metadata`."""
    if not h5py.is_hdf5(path):
        raise StoreError(
            f"{str(path)!r} exists and is not an HDF5 file; it was left untouched: choose another path or delete it"
        )
    with open_for_reading(path)[0] as file:
        check_compatible(read_metadata(file, path), metadata, path)
        return Progress.read(file)


def reopen(path: Path) -> h5py.File:
    """An existing, unfinished store at `path`, cut back to its committed rows and put in SWMR mode for writing.

    A store whose writer was killed cannot be opened for writing by HDF5 (its superblock still says it is being
    written): its committed rows are first copied into a fresh file that replaces it.
    """
    try:
        file = h5py.File(path, "r+", libver="latest")
    except OSError as error:
        if "already open for read-only" in str(error):
            raise StoreError(
                f"{str(path)!r} is open for reading in this process: close it (store.close()) to resume writing it"
            ) from None
        if not _open_for_write(error):
            raise StoreError(f"cannot open {str(path)!r} for writing: {first_line(error)}") from None
        _recover(path)  # the caller holds the writer's lock: the writer HDF5 remembers is dead
        file = h5py.File(path, "r+", libver="latest")
    _truncate(file, Progress.read(file))
    file.swmr_mode = True
    return file


def check_compatible(found: dict, wanted: dict, path: os.PathLike | str) -> None:
    """Refuse to continue a store made with other settings, naming each one that differs."""
    differences = [key for key in MUST_MATCH if found.get(key) != wanted.get(key)]
    if differences:
        details = "; ".join(f"{key}: store has {_short(found.get(key))}, this call {_short(wanted.get(key))}" for key in differences)
        raise StoreError(
            f"{os.fspath(path)!r} holds another extraction ({details}); pass overwrite=True (--overwrite) to replace it"
        )


def append(file: h5py.File, progress: Progress, activations: Mapping[str, np.ndarray], columns: Mapping[str, np.ndarray],
           document_starts: np.ndarray, windows: int, complete: bool = False) -> Progress:
    """Write one batch's rows, flush, then commit them in `progress` and flush again. Returns the new progress."""
    n = len(columns["tokens"])
    end = progress.rows + n
    for hook, rows in activations.items():
        _extend(file[ACTIVATIONS][hook], progress.rows, rows)
    for column, values in columns.items():
        _extend(file[column], progress.rows, values)
    _extend(file[DOCUMENT_STARTS], progress.documents, document_starts)
    file.flush()
    committed = Progress(end, progress.windows + windows, progress.documents + len(document_starts), complete)
    file[PROGRESS][:] = committed.array()
    file.flush()
    return committed


def check_space(file: h5py.File, path: Path, activations: Mapping[str, np.ndarray]) -> None:
    """Refuse a batch the disk (or the process's file-size limit) cannot take, before HDF5 writes any of it: HDF5
    does not recover from a failed write, so it must not start one that cannot finish. Counts the rows, a fresh
    chunk per dataset (HDF5 allocates whole chunks) and a metadata margin."""
    chunks = sum(int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize for d in file[ACTIVATIONS].values())
    needed = sum(a.nbytes for a in activations.values()) + chunks + (1 << 20)
    stat = os.statvfs(path.parent)
    room = stat.f_bavail * stat.f_frsize
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        room = min(room, limit - os.path.getsize(path))
    if needed > room:
        raise OSError(errno.ENOSPC, f"no space for the next batch: it needs {needed:,} bytes and {max(room, 0):,} are left")


def _extend(dataset: h5py.Dataset, start: int, values: np.ndarray) -> None:
    dataset.resize(start + len(values), axis=0)
    if len(values):
        dataset[start:] = values


def _truncate(file: h5py.File, progress: Progress) -> None:
    """Drop rows past the committed ones (a batch the killed writer had begun)."""
    for dataset in [*file[ACTIVATIONS].values(), *(file[c] for c in ROW_COLUMNS)]:
        if dataset.shape[0] != progress.rows:
            dataset.resize(progress.rows, axis=0)
    if file[DOCUMENT_STARTS].shape[0] != progress.documents:
        file[DOCUMENT_STARTS].resize(progress.documents, axis=0)


def _recover(path: Path) -> None:
    """Copy a killed writer's committed rows into a fresh file and put it in place (the original stays intact
    until the copy is complete)."""
    copy = path.with_name(path.name + ".recovering")
    with h5py.File(path, "r", swmr=True) as source, h5py.File(copy, "w", libver="latest") as target:
        progress = Progress.read(source)
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for name in [*(f"{ACTIVATIONS}/{h}" for h in source[ACTIVATIONS]), *ROW_COLUMNS, DOCUMENT_STARTS, VOCAB, PROGRESS]:
            _copy_rows(source[name], target, name, progress)
    os.replace(copy, path)


def _copy_rows(dataset: h5py.Dataset, target: h5py.File, name: str, progress: Progress) -> None:
    limit = {PROGRESS: None, VOCAB: None, DOCUMENT_STARTS: progress.documents}.get(name, progress.rows)
    rows = dataset.shape[0] if limit is None else limit
    if dataset.maxshape[0] is None:
        copy = target.create_dataset(
            name, shape=(rows, *dataset.shape[1:]), maxshape=dataset.maxshape, chunks=dataset.chunks, dtype=dataset.dtype,
            compression=dataset.compression, compression_opts=dataset.compression_opts, shuffle=dataset.shuffle,
        )
        step = max(1, dataset.chunks[0]) * 16
        for start in range(0, rows, step):
            copy[start : min(rows, start + step)] = dataset[start : min(rows, start + step)]
    else:
        copy = target.create_dataset(name, data=dataset[:], dtype=dataset.dtype)
    for key, value in dataset.attrs.items():
        copy.attrs[key] = value


def _open_for_write(error: OSError) -> bool:
    """Whether HDF5 refused a file because its superblock says a writer has it open (running, or killed)."""
    message = str(error)
    return "already open for write" in message or "consistency flags" in message


def first_line(error: BaseException) -> str:
    """An error's first line, for one-line messages (HDF5's run over several)."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def to_storage(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the array HDF5 stores (bfloat16 as its uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def from_storage(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows back as a tensor of `dtype` (undoing `to_storage`)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
