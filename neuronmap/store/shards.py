"""Extraction past one process: under `torchrun` (or any launcher that sets `RANK` and `WORLD_SIZE`), process `r`
of `n` extracts the `r`-th contiguous share of the documents into `<store>.shards/rank-r-of-n.h5`, and rank 0 then
writes `<store>` as an index whose datasets are HDF5 virtual datasets over the shards, in rank order: reading it
gives the rows a single process would have written, in the same order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch.distributed as dist

from ..errors import InputError, StoreError
from . import layout


@dataclass(frozen=True)
class Shard:
    """This process's part of an extraction: documents `first` to `stop` (None: to the end) of the inputs."""

    rank: int = 0
    world: int = 1
    first: int = 0
    stop: int | None = None

    @property
    def count(self) -> int | None:
        return None if self.stop is None else self.stop - self.first

    def path(self, store: Path) -> Path:
        if self.world == 1:
            return store
        folder = shard_folder(store)
        folder.mkdir(exist_ok=True)
        return folder / f"rank-{self.rank:05d}-of-{self.world:05d}.h5"

    def describe(self) -> dict | None:
        if self.world == 1:
            return None
        return {"rank": self.rank, "world": self.world, "documents": [self.first, self.stop]}


def shard_folder(store: Path) -> Path:
    return store.with_name(store.name + ".shards")


def shard_of(count: int | None) -> Shard:
    """This process's share of `count` documents: all of them, unless a launcher started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard(stop=count)
    if count is None:
        raise InputError(
            "several processes need inputs of known length to share them out: pass a list, a file or a sized "
            "iterable (an HF datasets column is one)"
        )
    rank = int(os.environ["RANK"])
    return Shard(rank, world, rank * count // world, (rank + 1) * count // world)


def join_shards(store: Path, shard: Shard) -> None:
    """Wait for every process; then rank 0 writes the index joining the shards (atomically, as one rename)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        if shard.rank == 0:
            _write_index(store, [Shard(r, shard.world).path(store) for r in range(shard.world)])
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def _write_index(store: Path, paths: list[Path]) -> None:
    files = [h5py.File(path, "r") for path in paths]
    try:
        metadata = [layout.read_metadata(f, p) for f, p in zip(files, paths)]
        progress = [layout.Progress.read(f) for f in files]
        if not all(p.complete for p in progress):
            unfinished = [str(p) for p, done in zip(paths, progress) if not done.complete]
            raise StoreError(f"shards {unfinished} are unfinished: run the same command again to resume them")
        rows = np.cumsum([0] + [p.rows for p in progress])
        joined = dict(metadata[0], shard=None, shards=[os.path.relpath(p, store.parent) for p in paths])
        partial = store.with_name(store.name + ".partial")
        with h5py.File(partial, "w", libver="latest") as index:
            index.attrs[layout.METADATA] = json.dumps(joined)
            names = [f"{layout.ACTIVATIONS}/{hook}" for hook in files[0][layout.ACTIVATIONS]] + list(layout.ROW_COLUMNS)
            for name in names:
                _virtual(index, name, files, paths, rows, store.parent)
            starts = [f[layout.DOCUMENT_STARTS][:] + offset for f, offset in zip(files, rows)]
            index.create_dataset(layout.DOCUMENT_STARTS, data=np.concatenate(starts).astype(np.int64))
            index.create_dataset(layout.VOCAB, data=files[0][layout.VOCAB][:], dtype=h5py.string_dtype())
            total = layout.Progress(int(rows[-1]), sum(p.windows for p in progress), sum(p.documents for p in progress), True)
            index.create_dataset(layout.PROGRESS, data=total.array())
        os.replace(partial, store)
    finally:
        for f in files:
            f.close()


def _virtual(index: h5py.File, name: str, files: list[h5py.File], paths: list[Path], rows: np.ndarray, root: Path) -> None:
    first = files[0][name]
    layout_ = h5py.VirtualLayout(shape=(int(rows[-1]), *first.shape[1:]), dtype=first.dtype)
    for f, path, start, stop in zip(files, paths, rows[:-1], rows[1:]):
        if stop > start:
            source = h5py.VirtualSource(os.path.relpath(path, root), name, shape=f[name].shape)
            layout_[int(start) : int(stop)] = source[: int(stop - start)]
    dataset = index.create_virtual_dataset(name, layout_)
    for key, value in first.attrs.items():
        dataset.attrs[key] = value
