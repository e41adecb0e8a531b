"""What every architecture adapter shares: the registry by model type, and the TransformerLens naming of a block.

An adapter is one function `hook_points(model) -> Iterable[HookPoint]` for one family, registered under the HF
`model_type` names it serves. It only points at the real modules; it never wraps or replaces them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from ..hooks import Derived, HeadResults, HeadSplit, HookPoint, NormScale, PerPrompt, Site

Adapter = Callable[[nn.Module], Iterable[HookPoint]]
ADAPTERS: dict[str, Adapter] = {}


def register(*model_types: str) -> Callable[[Adapter], Adapter]:
    """Register an adapter for the HF `config.model_type` names it serves."""

    def decorate(adapter: Adapter) -> Adapter:
        for model_type in model_types:
            ADAPTERS[model_type] = adapter
        return adapter

    return decorate


@dataclass(frozen=True)
class Place:
    """Where a hook point reads and writes: a side (`site`) of a real module, with heads carved out or a value
    derived from the module's input and output."""

    module: nn.Module
    site: Site
    heads: HeadSplit | None = None
    derived: Derived | None = None


def output(module: nn.Module, heads: HeadSplit | None = None) -> Place:
    """The hook point is the module's output (the first element when the module returns a tuple)."""
    return Place(module, "output", heads)


def input(module: nn.Module, heads: HeadSplit | None = None) -> Place:  # noqa: A001 - reads as the adapter's DSL
    """The hook point is the module's first input."""
    return Place(module, "input", heads)


def per_prompt(module: nn.Module, model: nn.Module) -> Place:
    """The hook point is the module's output `[1, pos, d]` expanded to `[batch, pos, d]` (learned position
    embeddings); `model` is the HF base model, whose input tells the batch size."""
    return Place(module, "derived", derived=PerPrompt(model))


@dataclass(frozen=True)
class Norm:
    """A normalisation module of a block or of the final residual stream: a LayerNorm, or with `rms` an RMSNorm.

    It gives two hook points, as in TransformerLens: `hook_scale` (`[batch, pos, 1]`, computed from its input) and
    `hook_normalized`: the module's output, weight and bias applied, which is what flows on and what the unfolded
    weights act on (`ln1.hook_normalized @ W_Q + b_Q` is `attn.hook_q`). That is TransformerLens 2's un-folded
    LayerNorm; TransformerLens 3 and its RMSNorm take `hook_normalized` before the weight (x / scale).
    """

    module: nn.Module
    rms: bool = False

    def places(self) -> dict[str, Place]:
        """The places of `hook_scale` and `hook_normalized`, keyed `scale` and `normalized`."""
        return {
            "scale": Place(self.module, "derived", derived=NormScale(centred=not self.rms)),
            "normalized": output(self.module),
        }


# The TransformerLens names of a block's hook points. `ln1.*` and `ln2.*` come from the `ln1` and `ln2` norms,
# `attn.hook_attn_scores` and `attn.hook_pattern` from the attention module, `attn.hook_result` from `z`.
_NAMES = {
    "resid_pre": "hook_resid_pre",
    "ln1_scale": "ln1.hook_scale",
    "ln1_normalized": "ln1.hook_normalized",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "ln2_scale": "ln2.hook_scale",
    "ln2_normalized": "ln2.hook_normalized",
    "mlp_pre": "mlp.hook_pre",
    "mlp_pre_linear": "mlp.hook_pre_linear",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
_ATTENTION = ["q", "k", "v", "attn_scores", "pattern", "z", "result", "attn_out"]
_MLP = ["mlp_pre", "mlp_pre_linear", "mlp_post", "mlp_out"]
_LN1, _LN2 = ["ln1_scale", "ln1_normalized"], ["ln2_scale", "ln2_normalized"]
# The order the forward pass reaches them: each norm before its sub-block (pre-LN), or after it (post-LN: BERT).
_PRE_LN = ["resid_pre", *_LN1, *_ATTENTION, "resid_mid", *_LN2, *_MLP, "resid_post"]
_POST_LN = ["resid_pre", *_ATTENTION, *_LN1, "resid_mid", *_MLP, *_LN2, "resid_post"]
# The places `block` makes from its named arguments; the adapter gives the others as keywords.
_MADE = {*_LN1, *_LN2, "attn_scores", "pattern", "z", "result"}


def block(
    layer: int,
    attention: nn.Module,
    *,
    ln1: Norm,
    ln2: Norm,
    z: Place,
    post_ln: bool = False,
    **places: Place | None,
) -> Iterator[HookPoint]:
    """The hook points of block `layer`, from `output(...)`/`input(...)` places keyed as in `_NAMES`.

    `attention` is the module that calls the HF attention function; its scores and pattern become
    `attn.hook_attn_scores` and `attn.hook_pattern` (`[batch, head, query_pos, key_pos]`). `z`, the input of the
    attention output projection split into heads, also gives `attn.hook_result` (each head's output through that
    projection). `ln1` and `ln2` are the norms before attention and before the MLP (`post_ln`: after them, as in
    BERT). A place given as None is a hook point this family does not have (e.g. `resid_mid` with parallel
    attention and MLP).
    """
    unknown = set(places) - (set(_NAMES) - _MADE)
    if unknown:
        raise TypeError(f"unknown block places: {sorted(unknown)}")
    places = {
        **places,
        **{f"ln1_{key}": place for key, place in ln1.places().items()},
        **{f"ln2_{key}": place for key, place in ln2.places().items()},
        "attn_scores": Place(attention, "scores"),
        "pattern": Place(attention, "pattern"),
        "z": z,
        "result": Place(z.module, "derived", derived=HeadResults(z.heads)),
    }
    for key in _POST_LN if post_ln else _PRE_LN:
        place = places.get(key)
        if place is not None:
            yield _hook_point(f"blocks.{layer}.{_NAMES[key]}", place)


def final_norm(norm: Norm) -> Iterator[HookPoint]:
    """`ln_final.hook_scale` and `ln_final.hook_normalized` of the norm on the last residual stream."""
    for key, place in norm.places().items():
        yield _hook_point(f"ln_final.hook_{key}", place)


def point(name: str, place: Place) -> HookPoint:
    """A hook point outside the blocks (`hook_embed`, `hook_pos_embed`, ...)."""
    return _hook_point(name, place)


def _hook_point(name: str, place: Place) -> HookPoint:
    pos_dim = 2 if place.site in ("scores", "pattern") else 1
    return HookPoint(name, place.module, place.site, place.heads, pos_dim, place.derived)
