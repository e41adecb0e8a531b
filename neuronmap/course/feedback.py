"""What every chapter's checkers share: the ✓/✗ lines they print, and plain-PyTorch ablation of heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


def passed(message: str) -> bool:
    print(f"✓ Correct: {message}")
    return True


def failed(message: str) -> bool:
    print(f"✗ Not yet: {message}")
    return False


def module_of(model: Any) -> nn.Module:
    """The Hugging Face module behind a NeuronMap model (or the module itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def zero_input_slice(module: nn.Module, start: int, stop: int) -> Iterator[None]:
    """Zero features `start:stop` of `module`'s input (e.g. one head's `z` entering the output projection)."""

    def hook(mod, args):
        features = args[0].clone()
        features[..., start:stop] = 0
        return (features, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
