"""Keeping the disk off the forward pass's path: rows leave the GPU through pinned buffers without waiting, a
background thread writes them while the next batch runs, and a bounded queue keeps memory flat.

`WriterLock` makes one process at a time the writer of a store, and tells a killed writer from a running one.
"""

from __future__ import annotations

import fcntl
import os
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import StoreError


class WriterLock:
    """An exclusive lock on `<store>.lock`, held while a process writes the store; the kernel drops it when the
    process dies, however it dies. The file is removed when the writer stops."""

    def __init__(self, store: Path):
        self.path = store.with_name(store.name + ".lock")
        self._handle = None

    def __enter__(self) -> WriterLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(f"{str(self.path.with_suffix(''))!r} is being written by {owner}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
        self._handle.close()  # closing releases the lock

    @staticmethod
    def held(store: Path) -> bool:
        """Whether a live process is writing `store` now."""
        path = store.with_name(store.name + ".lock")
        if not path.exists():
            return False
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False


class Offload:
    """Copies a batch's rows to host memory. On CUDA the copy runs on a side stream into reusable pinned buffers
    and returns at once, with an event the writer waits on; `slots` buffer sets bound the batches in flight. On
    the CPU the rows are already where the writer needs them."""

    def __init__(self, device: torch.device, slots: int):
        self.cuda = device.type == "cuda"
        self._free: queue.Queue[dict[str, torch.Tensor]] = queue.Queue()
        if self.cuda:
            self._stream = torch.cuda.Stream(device)
            for _ in range(slots):
                self._free.put({})

    def __call__(self, rows: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Callable[[], None], dict]:
        """Host copies of `rows`, a `ready()` the writer calls before reading them, and the buffers to `release`."""
        if not self.cuda:
            return dict(rows), lambda: None, {}
        buffers = self._free.get()  # waits while every slot is in flight
        self._stream.wait_stream(torch.cuda.current_stream())
        host = {}
        with torch.cuda.stream(self._stream):
            for name, tensor in rows.items():
                buffer = buffers.get(name)
                if buffer is None or buffer.shape[0] < tensor.shape[0] or buffer.shape[1:] != tensor.shape[1:]:
                    buffer = buffers[name] = torch.empty(
                        (max(tensor.shape[0], 1), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True
                    )
                tensor.record_stream(self._stream)  # the allocator must not reuse it before the copy is done
                host[name] = buffer[: tensor.shape[0]]
                host[name].copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done.synchronize, buffers

    def release(self, buffers: dict[str, torch.Tensor]) -> None:
        """Return a written batch's pinned buffers to the pool (nothing to do on the CPU)."""
        if self.cuda:
            self._free.put(buffers)


class Writer:
    """Runs `write(item)` for each submitted item, in order, on a background thread. `submit` blocks while `depth`
    items wait, so a slow disk slows the forward pass instead of filling memory. A failed write stops the writing;
    the next `submit` or `close` raises it."""

    def __init__(self, write: Callable[[Any], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="neuronmap-store-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        self._raise_failure()
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be written; raise the write failure, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise_failure()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as error:  # kept for the main thread, which raises it
                    self._error = error

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error
