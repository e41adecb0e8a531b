"""What every architecture adapter shares: the registry by model type, and the TransformerLens naming of a block.

An adapter is one function `hook_points(model) -> Iterable[HookPoint]` for one family, registered under the HF
`model_type` names it serves. It only points at the real modules; it never wraps or replaces them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import nn

from ..hooks import HeadSplit, HookPoint

Adapter = Callable[[nn.Module], Iterable[HookPoint]]
ADAPTERS: dict[str, Adapter] = {}


def register(*model_types: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter for the HF `config.model_type` names it serves."""

    def decorate(adapter: Adapter) -> Adapter:
        for model_type in model_types:
            ADAPTERS[model_type] = adapter
        return adapter

    return decorate


def output(module: nn.Module, heads: HeadSplit | None = None) -> tuple:
    """The hook point is the module's output (the first element when the module returns a tuple)."""
    return (module, "output", heads)


def input(module: nn.Module, heads: HeadSplit | None = None) -> tuple:  # noqa: A001 - reads as the adapter's DSL
    """The hook point is the module's first input."""
    return (module, "input", heads)


# The TransformerLens names of a block's hook points, in the order the forward pass reaches them.
_BLOCK_ORDER = {
    "resid_pre": "hook_resid_pre",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_pre": "mlp.hook_pre",
    "mlp_pre_linear": "mlp.hook_pre_linear",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


def block(layer: int, attention: nn.Module, **places: tuple | None) -> Iterator[HookPoint]:
    """The hook points of block `layer`, from `output(...)`/`input(...)` places keyed as in `_BLOCK_ORDER`.

    `attention` is the module that calls the HF attention function; its scores and pattern become
    `attn.hook_attn_scores` and `attn.hook_pattern` (`[batch, head, query_pos, key_pos]`). A place given
    as None is a hook point this family does not have (e.g. `resid_mid` with parallel attention and MLP).
    """
    unknown = set(places) - set(_BLOCK_ORDER)
    if unknown:
        raise TypeError(f"unknown block places: {sorted(unknown)}")
    places = {**places, "attn_scores": (attention, "scores", None), "pattern": (attention, "pattern", None)}
    for key, suffix in _BLOCK_ORDER.items():
        place = places.get(key)
        if place is None:
            continue
        module, site, heads = place
        pos_dim = 2 if site in ("scores", "pattern") else 1
        yield HookPoint(f"blocks.{layer}.{suffix}", module, site, heads, pos_dim)


def point(name: str, place: tuple) -> HookPoint:
    """A hook point outside the blocks (`hook_embed`, `ln_final.hook_normalized`, ...)."""
    module, site, heads = place
    return HookPoint(name, module, site, heads)
