"""Trace: what one run returns — output logits, the tokens run, and the activations captured by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .capture import Recorder
from .display import Renders, format_bytes, html_table
from .errors import HookNameError, NotCapturedError
from .inputs import Batch, token_strings


class Trace(Renders):
    """The result of `Model.run`: `.logits`, `.tokens`, `.str_tokens`, and `trace[name]` for captured activations.

    `.attention_mask` marks real tokens (1) and padding (0) in `.tokens`, e.g. for mean pooling over a batch;
    `.output` is the model's whole output (for models without logits, such as a bare `BertModel`). After a
    backward pass, `trace.grad(name)` is the gradient at each hook point named in `capture_grad`.
    """

    def __init__(
        self,
        output: Any,
        batch: Batch,
        recorder: Recorder,
        tokenizer: Any,
        model_name: str,
        hook_names: list[str],
    ):
        self.output = output
        self.tokens = batch.tokens
        self.attention_mask = batch.attention_mask
        self._activations = recorder.activations
        self._gradients = recorder.gradients
        self._hook_names = hook_names
        self._grad_names = [name for name in hook_names if name in recorder.grad_names]
        self._tokenizer = tokenizer
        self.model_name = model_name

    @property
    def logits(self) -> torch.Tensor | None:
        """The model's logits (None for models without a head, e.g. a bare `BertModel`: see `.output`)."""
        if isinstance(self.output, torch.Tensor):
            return self.output
        return getattr(self.output, "logits", None)

    @property
    def str_tokens(self) -> list[list[str]]:
        """Each prompt's tokens as strings (padding left out), one list per prompt."""
        if self.attention_mask is None:
            raise AttributeError("str_tokens: this trace's input was not token ids")
        return [token_strings(self._tokenizer, row[mask.bool()].tolist()) for row, mask in zip(self.tokens, self.attention_mask)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._activations:
            self._check_hook_name(name)
            raise NotCapturedError(
                name,
                f"{name!r} was not captured in this run; run again with model.run(..., capture={name!r}) "
                f"(captured: {_listed(self._activations)})",
            )
        return self._activations[name]

    def grad(self, name: str) -> torch.Tensor:
        """The gradient the latest backward pass brought to hook point `name` (d metric / d activation).

        Cut, cast and moved like the captures; the run must have named `name` in `capture_grad`.
        """
        if name not in self._grad_names:
            self._check_hook_name(name)
            raise NotCapturedError(
                name,
                f"no gradient is recorded for {name!r} in this run; run again with model.run(..., "
                f"capture_grad={name!r}) (recorded: {_listed(self._grad_names)})",
            )
        if name not in self._gradients:
            raise NotCapturedError(
                name,
                f"no gradient has reached {name!r} yet: call .backward() on a scalar computed from this trace "
                "(e.g. from trace.logits) first",
            )
        return self._gradients[name]

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """Every gradient recorded so far, by hook name."""
        return dict(self._gradients)

    def _check_hook_name(self, name: str) -> None:
        if name not in self._hook_names:
            raise HookNameError(name, self._hook_names)

    def __contains__(self, name: object) -> bool:
        return name in self._activations

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def keys(self) -> list[str]:
        return list(self._activations)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._activations.items())

    def attention(self, layers: list[int] | None = None):
        """The captured attention patterns (`blocks.*.attn.hook_pattern`) as an `AttentionPatterns` view."""
        from .attention import AttentionPatterns

        return AttentionPatterns.from_trace(self, layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured activations."""
        return sum(t.numel() * t.element_size() for t in self._activations.values())

    def __repr__(self) -> str:
        return (
            f"Trace({self.model_name!r}, tokens {list(self.tokens.shape)}, "
            f"{len(self)} activations, {format_bytes(self.nbytes)})"
        )

    def _repr_html_(self) -> str:
        rows = [
            (name, "×".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."), str(t.device), format_bytes(t.numel() * t.element_size()))
            for name, t in self._activations.items()
        ]
        caption = f"Trace of {self.model_name}: {len(self)} activations, tokens {list(self.tokens.shape)}, {format_bytes(self.nbytes)}"
        return html_table(caption, ("hook", "shape", "dtype", "device", "memory"), rows, numeric=(4,))


def _listed(names) -> str:
    names = [repr(name) for name in names]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "") if names else "nothing"
