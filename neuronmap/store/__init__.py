"""The activation store: stream a dataset's activations at some hook points into HDF5, crash-safe and resumable,
sharded across processes, and read them back lazily or as shuffled minibatches.

`extract(model, inputs, hooks, path)` writes a store; `ActivationStore(path)` (or `open_store`) reads one. Both load
h5py on first use, so `import neuronmap` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"extract": "extraction", "ActivationStore": "reader", "HookView": "reader", "open_store": "reader"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'neuronmap.store' has no attribute {name!r}")
    module = importlib.import_module(f".{_PUBLIC[name]}", __name__)
    value = getattr(module, "ActivationStore" if name == "open_store" else name)
    globals()[name] = value
    return value
