"""Loading a model by name: a zoo name, a local directory or a hub id, through `from_pretrained`.

A directory that does not exist is said to be one (not reported as a malformed hub id), zoo names never reach
the hub, and the hub options (`local_files_only`, `revision`, `token`, ...) reach the config and the tokenizer
as well as the model, so an offline call fails at once instead of retrying the network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .errors import LoadError

HUB_OPTIONS = frozenset(
    {"revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "force_download", "proxies", "subfolder"}
)
"""`from_pretrained` keyword arguments that say where and how to fetch files: the config and tokenizer get them too."""


def from_pretrained(
    source: str | os.PathLike, *, with_tokenizer: bool = True, **kwargs: Any
) -> tuple[nn.Module, Any, str | None, str | None]:
    """Load `source` with `from_pretrained`: the model, its tokenizer (or None), why there is no tokenizer, and the
    name a zoo entry goes by (None for other sources).

    `source` is a zoo name (`neuronmap.zoo.list()`), a local directory, or a hub id. `kwargs` go to the model's
    `from_pretrained`; those in `HUB_OPTIONS` also go to the config's and the tokenizer's. The tokenizer is
    loaded only `with_tokenizer`.
    """
    path, zoo_name = _locate(source, kwargs.get("subfolder"))
    import transformers

    hub = {key: value for key, value in kwargs.items() if key in HUB_OPTIONS}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **hub)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model = (model_class or transformers.AutoModel).from_pretrained(path, **kwargs)
    except OSError as error:
        raise LoadError(f"could not load {path!r} with from_pretrained: {error}") from None
    tokenizer, problem = _tokenizer(path, hub) if with_tokenizer else (None, None)
    return model, tokenizer, problem, zoo_name


def _locate(source: str | os.PathLike, subfolder: str | None) -> tuple[str, str | None]:
    """The path or hub id to hand to `from_pretrained`, after checking what can be checked without the network."""
    text = os.fspath(source)
    if not isinstance(source, os.PathLike) and not os.path.exists(text):
        zoo_path = _zoo_path(text)
        if zoo_path is not None:
            return str(zoo_path), text
        if not _looks_like_a_path(text):
            return text, None  # a hub id
    directory = Path(text).expanduser()
    if not directory.exists():
        raise LoadError(f"directory {text!r} does not exist (give a local model directory, a zoo name or a hub id)")
    if not directory.is_dir():
        raise LoadError(f"{text!r} is a file: give the directory that holds its config.json")
    if not (directory / (subfolder or "") / "config.json").exists():
        raise LoadError(
            f"directory {text!r} has no config.json, so it is not a saved Hugging Face model "
            "(save one with model.save_pretrained(directory))"
        )
    return str(directory), None


def _zoo_path(name: str) -> Path | None:
    from . import zoo

    return zoo.path(name) if name in zoo.NAMES else None


def _looks_like_a_path(text: str) -> bool:
    """A hub id is `name` or `owner/name`; anything shaped otherwise is meant as a local path."""
    return (
        text.startswith(("/", "./", "../", "~", "\\"))
        or text in (".", "..")
        or text.count("/") > 1
        or text.endswith(("/", "\\"))
        or "\\" in text
    )


def _tokenizer(path: str, hub: dict[str, Any]) -> tuple[Any, str | None]:
    """The tokenizer saved with the model, or None and the reason (also given as a warning, never swallowed)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, **hub), None
    except Exception as error:  # noqa: BLE001 - any failure here is reported, and strings are refused later with it
        problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        warnings.warn(
            f"no tokenizer was loaded for {os.path.basename(path) or path!r} ({problem}); run token ids, or pass "
            "one with neuronmap.load(..., tokenizer=...)",
            stacklevel=4,
        )
        return None, problem
