"""NeuronMap's exception types: each names what is wrong and, where it helps, what would be right."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NeuronMapError(Exception):
    """Base class of every error NeuronMap raises on purpose."""


class HookNameError(NeuronMapError, KeyError):
    """A hook name or pattern that names no hook point of the model."""

    def __init__(self, name: str, valid: Iterable[str], *, pattern: bool = False):
        valid = list(valid)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        what = "pattern" if pattern else "hook name"
        verb = "matches no hook point" if pattern else "is not a hook point of this model"
        message = f"{what} {name!r} {verb}"
        if close:
            message += f"; did you mean {', '.join(repr(c) for c in close)}?"
        else:
            message += f" ({len(valid)} hook points; see model.hook_names)"
        super().__init__(message)
        self.name = name
        self.suggestions = close

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0])


class NotCapturedError(NeuronMapError, KeyError):
    """A hook point that exists but was not captured (or has no gradient recorded) in this run."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name

    def __str__(self) -> str:
        return str(self.args[0])


class InputError(NeuronMapError, ValueError):
    """Inputs that cannot be run: empty, too long for the model, or strings without a tokenizer."""


class InterventionError(NeuronMapError, ValueError):
    """An intervention that cannot be applied: wrong shape, wrong type, or a function that failed (the function's
    own exception is kept as `__cause__`)."""


class LoadError(NeuronMapError, ValueError):
    """Something that `neuronmap.load` cannot turn into a model."""


class WeightError(NeuronMapError, AttributeError):
    """A weight a model does not have in TransformerLens's form: no adapter for its family, no learned position
    embeddings (rotary positions), or no unembedding (a bare encoder)."""


class StoreError(NeuronMapError, ValueError):
    """An activation store that cannot be written or read as asked: not a store, made by another extraction, held by
    another writer, or a write that failed (the store then keeps every batch committed before it)."""


class SAEError(NeuronMapError, ValueError):
    """A sparse autoencoder that cannot be built, loaded, trained or spliced as asked: a width that does not match its
    hook, a file that is not an SAE (or a truncated one), an unknown architecture or field, or a loss that diverged."""


class TunedLensError(NeuronMapError, ValueError):
    """A tuned lens that cannot be used, loaded or trained as asked: made for another model, a file that is not a
    tuned lens (or a torn one), or a loss that diverged (`.step` names the step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class ReportError(NeuronMapError):
    """A report template's cell failed (the message names the cell and where the partial notebook was kept), or its
    run timed out or lost its kernel."""
