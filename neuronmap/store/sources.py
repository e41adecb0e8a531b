"""Extraction inputs as a stream of documents, and documents as context-sized windows of token ids.

Inputs are read lazily (a text or JSON-lines file line by line, any iterable item by item), so a dataset larger
than memory streams through. A document keeps its index in the inputs all the way into the store.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import InputError

Source = Union[str, os.PathLike, torch.Tensor, Iterable[Any]]
_TOKENIZE_GROUP = 256  # documents tokenised per call: the fast tokenizer batches them in Rust


@dataclass(frozen=True)
class Documents:
    """Where documents come from: a way to iterate over them, how many there are (None: unknown until read),
    and a JSON-able description kept in the store's metadata."""

    open: Any  # () -> Iterator[str | list[int]]
    count: int | None
    description: dict


@dataclass(frozen=True)
class Window:
    """Up to `context` consecutive tokens of one document, starting at position `start` of it. A document with
    no tokens at all is one empty window, so document indices stay those of the inputs."""

    document: int
    start: int
    tokens: list[int]


def documents(inputs: Source, text_field: str = "text") -> Documents:
    """Recognise `inputs`: a text file (one document per line), a JSON-lines file (`.jsonl`/`.json`, the
    `text_field` of each record), a token tensor (`[pos]`: one document, `[documents, pos]`: one per row), a list
    of strings, or any iterable of strings, of lists of token ids, or of records holding `text_field` (an HF
    `datasets` dataset or column works)."""
    if isinstance(inputs, (str, os.PathLike)):
        return _file(Path(inputs), text_field)
    if isinstance(inputs, torch.Tensor):
        return _tensor(inputs)
    if isinstance(inputs, Mapping) or not isinstance(inputs, Iterable):
        raise InputError(
            f"cannot extract from a {type(inputs).__name__}: give a list of strings, a text or JSON-lines file, "
            "a token tensor, or an iterable of strings"
        )
    count = len(inputs) if hasattr(inputs, "__len__") else None
    if count == 0:
        raise InputError("inputs are empty: give at least one document")
    return Documents(
        lambda: (_text(item, text_field, i) for i, item in enumerate(inputs)),
        count,
        {"kind": "iterator" if isinstance(inputs, Iterator) else type(inputs).__name__, "documents": count},
    )


def _text(item: Any, field: str, index: int) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
        return list(item)  # a document given as token ids
    if isinstance(item, Mapping):
        if field not in item:
            raise InputError(f"document {index} has no field {field!r} (it has {sorted(item)[:8]}); set text_field")
        item = item[field]
        if isinstance(item, str):
            return item
    raise InputError(f"document {index} is a {type(item).__name__}, not a string (or a list of token ids)")


def _file(path: Path, text_field: str) -> Documents:
    if not path.is_file():
        if not path.exists():
            hint = " (to extract one text, pass it in a list: [text])" if len(str(path)) > 255 or " " in str(path) else ""
            raise InputError(f"input file {str(path)[:120]!r} does not exist{hint}")
        raise InputError(f"input {str(path)!r} is not a file")
    jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(path, "rb") as handle:
        count = sum(1 for line in handle if line.strip()) if jsonl else sum(1 for _ in handle)
    if count == 0:
        raise InputError(f"input file {str(path)!r} is empty")
    description = {"kind": "jsonl" if jsonl else "text", "path": str(path.resolve()), "documents": count}
    if jsonl:
        description["text_field"] = text_field
    return Documents(lambda: _jsonl(path, text_field) if jsonl else _lines(path), count, description)


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield line.removesuffix("\n").removesuffix("\r")


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        index = 0
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path.name} line {number} is not JSON: {error.msg}") from None
            if not isinstance(record, Mapping):
                raise InputError(f"{path.name} line {number} is a JSON {type(record).__name__}, not an object")
            yield _text(record, field, index)
            index += 1


def _tensor(tokens: torch.Tensor) -> Documents:
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InputError(f"token ids must be integers, not {tokens.dtype}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise InputError(f"token ids must be a non-empty [pos] or [documents, pos] tensor, got shape {list(tokens.shape)}")
    rows = tokens.detach().cpu().long()
    return Documents(lambda: iter(rows.tolist()), rows.shape[0], {"kind": "tokens", "shape": list(tokens.shape)})


def windows(
    docs: Iterable[str | list[int]], tokenizer: Any, context: int, first_document: int = 0
) -> Iterator[Window]:
    """Tokenise each document (special tokens as the tokenizer adds them) and cut it into windows of at most
    `context` tokens. Documents given as token ids are cut as they are."""
    index = first_document
    docs = iter(docs)
    while group := list(itertools.islice(docs, _TOKENIZE_GROUP)):
        texts = [d for d in group if isinstance(d, str)]
        if texts and tokenizer is None:
            raise InputError("text inputs need a tokenizer: load the model with one, or give token ids")
        encoded = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]) if texts else iter(())
        for document in group:
            ids = next(encoded) if isinstance(document, str) else document
            if not ids:
                yield Window(index, 0, [])
            for start in range(0, len(ids), context):
                yield Window(index, start, list(ids[start : start + context]))
            index += 1


@dataclass(frozen=True)
class TokenBatch:
    """Windows padded on the right into one forward pass: `tokens`/`mask` `[windows, pos]` and the windows."""

    tokens: torch.Tensor
    mask: torch.Tensor
    windows: list[Window]


def token_batches(inputs: Source, tokenizer: Any, pad: int, context: int, batch_size: int,
                  text_field: str = "text") -> Iterator[TokenBatch]:
    """Any extraction input as padded batches of `batch_size` non-empty windows of at most `context` tokens
    (empty documents are skipped): what analyses that stream a dataset through a model iterate over."""
    docs = documents(inputs, text_field)
    stream = (w for w in windows(docs.open(), tokenizer, context) if w.tokens)
    while group := list(itertools.islice(stream, batch_size)):
        width = max(len(w.tokens) for w in group)
        tokens = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, window in enumerate(group):
            tokens[row, : len(window.tokens)] = torch.tensor(window.tokens)
            mask[row, : len(window.tokens)] = 1
        yield TokenBatch(tokens, mask, group)
