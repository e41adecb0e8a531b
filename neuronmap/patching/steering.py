"""Steering: add a vector at a hook point, in `run`, `with model.hooks(...)` and `generate` (KV cache on).

`steering_vector` makes one as the difference of mean activations over two sets of prompts (contrastive
activation addition); `steer` returns the intervention that adds it, checked against the hook point's width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..inputs import Inputs

AT = ("last", "mean")


def steer(model, hook: str, vector: torch.Tensor, coefficient: float = 1.0) -> dict[str, Callable]:
    """`{hook: add coefficient × vector}` at every position of every run it is attached to, one new position per
    step during generation. `vector` must be as wide as the hook point's last dimension."""
    name = _one(model, hook)
    vector = torch.as_tensor(vector)
    width = model.run(torch.zeros(1, 1, dtype=torch.long), capture=name)[name].shape[-1]
    if vector.shape != (width,):
        raise InputError(f"steering vector has shape {list(vector.shape)}; {name} is {width} wide, so give [{width}]")
    added = coefficient * vector

    def add(activation: torch.Tensor, point) -> torch.Tensor:
        return activation + added.to(activation.device, activation.dtype)

    return {name: add}


def steering_vector(model, positive: Inputs, negative: Inputs, hook: str, at: str = "last") -> torch.Tensor:
    """Mean activation at `hook` over `positive` prompts minus that over `negative` ones: at each prompt's last
    real token (`at="last"`) or averaged over all its real tokens (`"mean"`)."""
    if at not in AT:
        raise InputError(f"at must be one of {AT}, not {at!r}")
    name = _one(model, hook)
    return _mean(model, positive, name, at) - _mean(model, negative, name, at)


def _mean(model, prompts: Inputs, name: str, at: str) -> torch.Tensor:
    trace = model.run(prompts, capture=name)
    values, mask = trace[name], trace.attention_mask.to(trace[name].device)
    if at == "last":
        last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(1)
        return values[torch.arange(len(last)), last].mean(0)
    weights = mask.unsqueeze(-1).to(values.dtype)
    return ((values * weights).sum(1) / weights.sum(1)).mean(0)


def _one(model, hook: str) -> str:
    names = model.resolve(hook)
    if len(names) != 1:
        raise InputError(f"steering needs one hook point; {hook!r} names {len(names)}: {names[:4]}")
    return names[0]
