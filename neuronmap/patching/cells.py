"""What a sweep patches: its cells (one hook point, and which part of its activation) and the result's axes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

COMPONENTS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "result": "attn.hook_result",
    "pattern": "attn.hook_pattern",
}
"""Short names for `what`: each is `blocks.{L}.<hook>` for every layer L."""

_PER_HEAD = {"z", "q", "k", "v", "result", "pattern"}
_PER_POSITION = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "result"}
BY = {
    "layer_pos": "layer × position",
    "layer_head": "layer × head (all positions)",
    "layer_head_pos": "layer × head × position",
    "layer": "hook point (the whole activation)",
}


@dataclass(frozen=True)
class Cell:
    """One patch: `index` into hook point `name`'s activation (positions counted in the full input), and the same
    at the hook points in `more`.

    `layer` is the first block the cell writes in (the sweep resumes there from the cached run); `position` is the
    one token position the cell patches when it patches one, and None otherwise.
    """

    name: str
    layer: int
    index: tuple
    position: int | None = None
    more: tuple[tuple[str, tuple], ...] = ()

    @property
    def parts(self) -> tuple[tuple[str, tuple], ...]:
        """Every (hook name, index) the cell writes: its own, and `more` (e.g. a window of layers)."""
        return ((self.name, self.index), *self.more)


@dataclass
class Plan:
    """The cells of a sweep in result order, and the result's axes: (name, labels) for each dimension."""

    cells: list[Cell]
    axes: list[tuple[str, list[str]]]
    what: str
    by: str


def plan(
    model,
    what: str,
    by: str | None,
    str_tokens: list[str],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Plan:
    """The cells for patching `what` by `by` on inputs of `len(str_tokens)` positions (labelled by `str_tokens`)."""
    layers_in_model = n_layers(model)
    if what not in COMPONENTS:
        return _by_hook(model, what, by, layers_in_model)
    by = by or ("layer_head" if what in _PER_HEAD else "layer_pos")
    if by not in BY:
        raise InputError(f"by={by!r} is not a sweep; choose one of {sorted(BY)}")
    if "pos" in by and what not in _PER_POSITION:
        raise InputError(f"{what} cannot be patched by position; patch it by='layer_head' or by='layer'")
    if "head" in by and what not in _PER_HEAD:
        raise InputError(f"{what} has no heads; patch by='layer_pos' or by='layer', or choose one of {sorted(_PER_HEAD)}")
    chosen_layers = _chosen(layers, layers_in_model, "layer")
    names = {layer: f"blocks.{layer}.{COMPONENTS[what]}" for layer in chosen_layers}
    missing = [name for name in names.values() if name not in model.hook_names]
    if missing:
        raise InputError(f"this model has no {missing[0]} (e.g. parallel attention and MLP have no resid_mid)")
    if by == "layer":
        cells = [Cell(names[layer], layer, ()) for layer in chosen_layers]
        return Plan(cells, [("layer", [str(layer) for layer in chosen_layers])], what, by)
    chosen_heads = _chosen(heads, _heads_of(model, names[chosen_layers[0]], what), "head") if "head" in by else []
    chosen_positions = _chosen(positions, len(str_tokens), "position") if "pos" in by else []
    cells = []
    for layer in chosen_layers:
        if by == "layer_pos":
            cells += [Cell(names[layer], layer, (slice(None), p), p) for p in chosen_positions]
        elif by == "layer_head":
            index = (lambda h: (slice(None), h)) if what == "pattern" else (lambda h: (slice(None), slice(None), h))
            cells += [Cell(names[layer], layer, index(h)) for h in chosen_heads]
        else:
            cells += [Cell(names[layer], layer, (slice(None), p, h), p) for h in chosen_heads for p in chosen_positions]
    axes = [("layer", [str(layer) for layer in chosen_layers])]
    if "head" in by:
        axes.append(("head", [str(h) for h in chosen_heads]))
    if "pos" in by:
        axes.append(("position", [f"{p} {str_tokens[p]}" for p in chosen_positions]))
    return Plan(cells, axes, what, by)


def n_layers(model) -> int:
    """The model's blocks; patching needs TransformerLens's block hook points, so a model without them is refused."""
    layers = sum(1 for name in model.hook_names if name.endswith(".hook_resid_pre"))
    if layers == 0:
        raise InputError(
            f"patching needs a model of a family NeuronMap has an adapter for (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, "
            f"BERT, RoBERTa); {model.name!r} uses the {model.architecture} adapter, without blocks.L hook points"
        )
    return layers


def _by_hook(model, what: str, by: str | None, layers_in_model: int) -> Plan:
    """Cells patching the whole activation of each hook point `what` names (a name or a glob)."""
    if by not in (None, "layer"):
        raise InputError(
            f"what={what!r} is a hook name or pattern, patched whole (by='layer'); by={by!r} needs one of the "
            f"components {sorted(COMPONENTS)}"
        )
    names = model.resolve(what)
    cells = [Cell(name, layer_of(model, name, layers_in_model), ()) for name in names]
    return Plan(cells, [("hook point", names)], what, "layer")


def layer_of(model, name: str, layers_in_model: int) -> int:
    """The block a hook point is in: from its name, 0 before the blocks, `n_layers` after them."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1))
    names = model.hook_names
    first_block = next((i for i, n in enumerate(names) if n.startswith("blocks.")), len(names))
    return 0 if names.index(name) < first_block else layers_in_model


def _heads_of(model, name: str, what: str) -> int:
    """Heads of a per-head hook point: its own split (k and v: the key-value heads), else the query heads."""
    heads = model._points[name].heads
    return heads.n_heads if heads is not None else model._points[re.sub(r"hook_\w+$", "hook_q", name)].heads.n_heads


def _chosen(values: Sequence[int] | None, count: int, what: str) -> list[int]:
    """Indices into `count` things (negative ones from the end), in the order given; all of them when None."""
    if values is None:
        return list(range(count))
    if isinstance(values, int):
        values = [values]
    chosen = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not -count <= value < count:
            raise InputError(f"{what} {value!r} is out of range: there are {count} ({what}s 0 to {count - 1})")
        chosen.append(value % count)
    return chosen
