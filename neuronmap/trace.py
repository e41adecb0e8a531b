"""Trace: what one run returns — output logits, the tokens run, and the activations captured by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .display import Renders, format_bytes, html_table
from .errors import HookNameError
from .inputs import Batch


class Trace(Renders):
    """The result of `Model.run`: `.logits`, `.tokens`, `.str_tokens`, and `trace[name]` for captured activations.

    `.attention_mask` marks real tokens (1) and padding (0) in `.tokens`, e.g. for mean pooling over a batch;
    `.output` is the model's whole output (for models without logits, such as a bare `BertModel`).
    """

    def __init__(self, output: Any, batch: Batch, activations: dict[str, torch.Tensor], tokenizer: Any, model_name: str):
        self.output = output
        self.tokens = batch.tokens
        self.attention_mask = batch.attention_mask
        self._activations = activations
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
        if self._tokenizer is None:
            return [[str(int(t)) for t, keep in zip(row, mask) if keep] for row, mask in zip(self.tokens, self.attention_mask)]
        return [
            [self._tokenizer.decode([int(t)]) for t, keep in zip(row, mask) if keep]
            for row, mask in zip(self.tokens, self.attention_mask)
        ]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._activations:
            raise HookNameError(name, self._activations)
        return self._activations[name]

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
