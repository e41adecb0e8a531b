"""Turning what a user passes to `Model.run` (a string, strings, or token ids) into padded model inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from .errors import InputError

Inputs = Union[str, Sequence[str], torch.Tensor]


@dataclass
class Batch:
    """Token ids `[batch, pos]` with their attention mask (1 = real token, 0 = padding).

    For a module that is not an HF model, `tokens` is its input, whatever it is, and the mask is None.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.tokens.to(device), mask)

    @property
    def last_positions(self) -> torch.Tensor:
        """Index of each row's last real token (right or left padding alike)."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (positions * self.attention_mask).argmax(dim=1)


def to_batch(
    inputs: Inputs,
    tokenizer: Any,
    attention_mask: torch.Tensor | None,
    max_length: int | None,
    vocab_size: int | None = None,
    padding_side: str | None = None,
) -> Batch:
    """Tokenise (padding a list of strings on `padding_side`, by default the tokenizer's) or validate token ids.

    Token ids outside `0 .. vocab_size - 1` are refused here, where the error can name them, rather than deep
    inside the embedding.
    """
    if isinstance(inputs, str) or (isinstance(inputs, Sequence) and not isinstance(inputs, torch.Tensor)):
        batch = _tokenize([inputs] if isinstance(inputs, str) else list(inputs), tokenizer, padding_side)
    elif isinstance(inputs, torch.Tensor):
        batch = _from_tokens(inputs, attention_mask)
    else:
        raise InputError(f"inputs must be a string, a list of strings or a token tensor, not {type(inputs).__name__}")
    length = batch.tokens.shape[1]
    if max_length is not None and length > max_length:
        raise InputError(f"input is {length} tokens long but the model's context is {max_length} tokens")
    if vocab_size is not None:
        _check_vocabulary(batch, vocab_size)
    return batch


def _check_vocabulary(batch: Batch, vocab_size: int) -> None:
    outside = (batch.tokens < 0) | (batch.tokens >= vocab_size)  # padding too: the embedding looks it up
    if outside.any():
        row, position = (int(i) for i in outside.nonzero()[0])
        token = int(batch.tokens[row, position])
        raise InputError(
            f"token id {token} at [{row}, {position}] is outside the model's vocabulary: ids run from 0 to {vocab_size - 1}"
        )


def _tokenize(texts: list[str], tokenizer: Any, padding_side: str | None = None) -> Batch:
    if not texts:
        raise InputError("inputs are empty: give at least one string")
    if not all(isinstance(text, str) for text in texts):
        raise InputError("a list of inputs must hold only strings (pass token ids as a tensor)")
    if tokenizer is None:
        raise InputError("strings need a tokenizer: pass one to neuronmap.load(model, tokenizer=...) or give token ids")
    rows = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    if any(len(row) == 0 for row in rows):
        raise InputError("an input string is empty (it tokenises to no tokens)")
    width = max(len(row) for row in rows)
    pad = pad_id(tokenizer)
    left = (padding_side or getattr(tokenizer, "padding_side", "right")) == "left"
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return Batch(tokens, mask)


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as its own text (its id as text when there is no tokenizer)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's padding token, else its end-of-text token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _from_tokens(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> Batch:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"token ids must be integers, not {tokens.dtype}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2:
        raise InputError(f"token ids must be [pos] or [batch, pos], got shape {list(tokens.shape)}")
    if tokens.numel() == 0:
        raise InputError(f"inputs are empty: token ids of shape {list(tokens.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    elif attention_mask.shape != tokens.shape:
        if attention_mask.dim() == 1 and attention_mask.shape[0] == tokens.shape[1]:
            attention_mask = attention_mask.unsqueeze(0)
        else:
            raise InputError(
                f"attention_mask shape {list(attention_mask.shape)} does not match tokens {list(tokens.shape)}"
            )
    return Batch(tokens.long(), attention_mask.long())
