"""Ablations as interventions: zero, mean or resample heads, MLPs, neurons and residual directions.

`ablate(...)` returns `{hook name: function}`, for `model.run(..., interventions=...)` or `with model.hooks(...)`.
A mean is taken over every real token of the reference prompts (so prompts of any length can serve); resampling
puts each row's activation at each position from a reference prompt drawn at random (seeded), position by position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import InputError
from ..inputs import Inputs

HOW = ("zero", "mean", "resample")


def ablate(
    model,
    *,
    heads: Iterable[tuple[int, int]] = (),
    mlps: Iterable[int] = (),
    neurons: Iterable[tuple[int, int]] = (),
    directions: Mapping[str, torch.Tensor] | None = None,
    how: str = "zero",
    reference: Inputs | None = None,
    reference_mask: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, Callable]:
    """Interventions removing components: `heads` as (layer, head) through `attn.hook_z`, `mlps` by layer through
    `hook_mlp_out`, `neurons` as (layer, index) through `mlp.hook_post`, and `directions` {hook name: vector}
    (the activation's component along the vector). `how`: `"zero"`, `"mean"` (over `reference`'s real tokens) or
    `"resample"` (from `reference` prompts drawn with `seed`); `reference_mask` is the attention mask of reference
    token ids with padding."""
    if how not in HOW:
        raise InputError(f"how must be one of {HOW}, not {how!r}")
    if how != "zero" and reference is None:
        raise InputError(f"{how} ablation needs reference prompts: ablate(..., how={how!r}, reference=[...])")
    parts: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for layer, head in heads:
        parts.setdefault(_checked(model, f"blocks.{layer}.attn.hook_z"), []).append(_select(2, head, model, f"blocks.{layer}.attn.hook_z"))
    for layer in mlps:
        parts.setdefault(_checked(model, f"blocks.{layer}.hook_mlp_out"), []).append(lambda x: x)
    for layer, index in neurons:
        parts.setdefault(_checked(model, f"blocks.{layer}.mlp.hook_post"), []).append(_select(-1, index, model, f"blocks.{layer}.mlp.hook_post"))
    for name, vector in (directions or {}).items():
        parts.setdefault(_checked(model, name), []).append(_along(model, name, vector))
    if not parts:
        raise InputError("nothing to ablate: give heads=, mlps=, neurons= or directions=")
    reference_trace = (
        model.run(reference, capture=sorted(parts), attention_mask=reference_mask) if reference is not None else None
    )
    interventions = {}
    for name, selections in parts.items():
        replacement = _replacement(how, reference_trace, name, seed)
        interventions[name] = _ablation(selections, replacement)
    return interventions


def _ablation(selections: list, replacement: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def intervene(activation: torch.Tensor, hook) -> torch.Tensor:
        new = replacement(activation)
        for part in selections:
            activation = activation - part(activation) + part(new)
        return activation

    return intervene


def _replacement(how: str, trace, name: str, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the ablated part takes: zeros, the reference's mean over real tokens, or reference rows at random."""
    if how == "zero":
        return torch.zeros_like
    values, mask = trace[name], trace.attention_mask.to(trace[name].device)
    if how == "mean":
        weights = mask.reshape(*mask.shape, *[1] * (values.dim() - 2)).to(values.dtype)
        mean = (values * weights).sum((0, 1)) / weights.sum((0, 1))
        return lambda activation: mean.to(activation.dtype).expand_as(activation)
    generator = torch.Generator().manual_seed(seed)

    def resample(activation: torch.Tensor) -> torch.Tensor:
        if activation.shape[1] > values.shape[1]:
            raise InputError(
                f"resample ablation of {name}: the run has {activation.shape[1]} positions but the reference prompts "
                f"only {values.shape[1]}; give reference prompts at least as long"
            )
        rows = torch.randint(values.shape[0], (activation.shape[0],), generator=generator)
        return values[rows, : activation.shape[1]].to(activation.device, activation.dtype)

    return resample


def _select(dim: int, index: int, model, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The part of an activation at `index` along `dim` (everything else zero): one head, or one neuron."""
    size = _size(model, name, dim)
    if not -size <= index < size:
        raise InputError(f"index {index} is out of range for {name}, which has {size} along that dimension (0 to {size - 1})")

    def part(x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(x.shape[dim], dtype=x.dtype, device=x.device)
        keep[index] = 1
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * keep.reshape(shape)

    return part


def _along(model, name: str, vector: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The component of an activation along `vector` (its projection on the unit vector)."""
    width = _size(model, name, -1)
    vector = torch.as_tensor(vector)
    if vector.shape != (width,):
        raise InputError(f"direction for {name} has shape {list(vector.shape)}; {name} is {width} wide, so give [{width}]")
    unit = vector / vector.norm()

    def part(x: torch.Tensor) -> torch.Tensor:
        u = unit.to(x.device, x.dtype)
        return (x @ u).unsqueeze(-1) * u

    return part


def _size(model, name: str, dim: int) -> int:
    """The width of a hook point's activation along `dim`, from one run of a single token."""
    probe = model.run(torch.zeros(1, 1, dtype=torch.long), capture=name)[name]
    return probe.shape[dim]


def _checked(model, name: str) -> str:
    model.resolve(name)  # a HookNameError naming the closest hook point when there is none
    return name
