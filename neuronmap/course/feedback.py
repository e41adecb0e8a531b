"""What every chapter's checkers share: the ✓/✗ lines they print, placeholders, and plain-PyTorch head ablation.

A course gives hints before answers. A ✗ line says what is wrong and hints at what would be right without
naming the answer; the answer is printed only when the student asks for it with `reveal=True`. An answer that
still holds the exercise's placeholder (`answer = ...`, or a function whose body is `...` and so returns None)
gets one friendly "replace the `...`" line, never an exception, so a student copy runs top to bottom.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

PLACEHOLDER_HINT = "replace the `...` in the exercise cell above with your answer, run it, then run this check again"
REVEAL_HINT = "(Pass reveal=True to see the answer.)"


def passed(message: str) -> bool:
    """Print the ✓ line for a right answer; returns True."""
    print(f"✓ Correct: {message}")
    return True


def failed(hint: str, answer: Callable[[], str] | None = None, reveal: bool = False) -> bool:
    """Print the ✗ line with `hint`; with `reveal`, also the answer (`answer()`, computed only then). Returns False."""
    line = f"✗ Not yet: {hint}"
    if answer is not None:
        line = line if line.endswith((".", "!", "?")) else f"{line}."
        line += f"\n  The answer: {answer()}" if reveal else f" {REVEAL_HINT}"
    print(line)
    return False


def is_placeholder(answer: Any) -> bool:
    """Whether `answer` is what an untouched exercise cell leaves: `...` or None."""
    return answer is Ellipsis or answer is None


def not_started(answer: Callable[[], str] | None = None, reveal: bool = False) -> bool:
    """The ✗ line for an answer that is still the placeholder."""
    return failed(PLACEHOLDER_HINT, answer, reveal)


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
