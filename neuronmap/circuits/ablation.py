"""What an edge carries when it is cut: the corrupted prompts' activations, a mean or a resample ablation.

Wherever a circuit function takes `corrupt`, it takes counterfactual prompts (one per clean prompt, the same
number of tokens each), or one of these:

- `mean_ablation(reference)`: every sender's output is replaced by its mean over the reference prompts' runs, at
  each position by default (the first token's activations are unlike the others', and positions carry the
  position embeddings), or over every real token with `per_position=False` (reference prompts of any length). The
  "corrupted run" is the forward in which every sender writes its mean: on a pre-norm model that is exactly the run
  with every edge ablated. For attribution its gradients are taken through that run with each node still answering
  its own input to first order (the mean plus the node's deviation, whose value is zero), because replacing the
  outputs outright would leave no gradient at any receiver but the logits.
- `resample_ablation(prompts, seed=...)`: clean prompt i's corrupted run is the run of another prompt, chosen by a
  seeded derangement (no prompt is its own corruption); every prompt must have the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..inputs import Batch, Inputs


class MeanAblation:
    """Cut edges carry their sender's mean output over `reference` prompts (per position unless `per_position` is
    False). Made by `mean_ablation`."""

    def __init__(self, reference: Inputs | None, per_position: bool):
        self.reference, self.per_position = reference, per_position

    def __repr__(self) -> str:
        where = "per position" if self.per_position else "over all positions"
        return f"mean_ablation({'the clean prompts' if self.reference is None else 'reference prompts'}, {where})"


class ResampleAblation:
    """Cut edges carry another prompt's activations: clean prompt i's corrupted run is `prompts[σ(i)]`'s, σ a
    derangement drawn with `seed`. Made by `resample_ablation`."""

    def __init__(self, prompts: Inputs | None, seed: int):
        self.prompts, self.seed = prompts, seed

    def __repr__(self) -> str:
        return f"resample_ablation({'the clean prompts' if self.prompts is None else 'prompts'}, seed={self.seed})"


def mean_ablation(reference: Inputs | None = None, *, per_position: bool = True) -> MeanAblation:
    """Corruption by mean ablation: each sender's output replaced by its mean over `reference` prompts (default: the
    clean prompts themselves), at each position (`reference` then needs the clean prompts' number of positions) or,
    with `per_position=False`, over every real token."""
    return MeanAblation(reference, bool(per_position))


def resample_ablation(prompts: Inputs | None = None, *, seed: int = 0) -> ResampleAblation:
    """Corruption by resampling: clean prompt i's corrupted run is the run of `prompts[σ(i)]` (default: the clean
    prompts themselves), σ a derangement of the prompts drawn with `seed`; all prompts the same number of tokens."""
    if not isinstance(seed, int):
        raise InputError(f"seed must be a whole number, got {seed!r}")
    return ResampleAblation(prompts, seed)


Ablation = (MeanAblation, ResampleAblation)

SENDER_HOOKS = "blocks.0.hook_resid_pre", "attn.hook_z", "hook_mlp_out"
"""Where the senders' outputs are written: the residual stream's start (embeddings), each layer's heads before the
output projection (linear, so a mean of `hook_z` is the mean of every head's output), each layer's MLP."""


@dataclass
class Corruption:
    """The corrupted run: the prompts it reads and, for a mean ablation, the mean value of every sender hook point
    (`means`, shaped `[1, positions or 1, ...]`)."""

    batch: Batch
    means: dict[str, torch.Tensor] | None

    def interventions(self, leave: str | None = None) -> dict[str, Callable]:
        """For a mean ablation, every sender hook point (but `leave`) writing its mean: the value is the mean
        exactly, and the gradient still reaches the node's own input (mean + x - x.detach())."""
        if self.means is None:
            return {}
        return {name: _mean_of(mean) for name, mean in self.means.items() if name != leave}


def sender_hooks(n_layers: int) -> list[str]:
    """Every hook point a sender writes at, bottom to top."""
    names = [SENDER_HOOKS[0]]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{SENDER_HOOKS[1]}", f"blocks.{layer}.{SENDER_HOOKS[2]}"]
    return names


def corruption(model, clean, corrupt, n_layers: int) -> tuple[Batch, Corruption]:
    """The `clean` prompts as a batch on the model's device, and the corrupted run `corrupt` (prompts, a mean or a
    resample ablation) makes of them."""
    from ..patching.sweep import paired

    if isinstance(corrupt, MeanAblation):
        clean_batch = model._batch(clean).to(model.device)
        return clean_batch, Corruption(clean_batch, _means(model, clean_batch, corrupt, n_layers))
    if isinstance(corrupt, ResampleAblation):
        clean_batch = model._batch(clean)
        prompts = clean_batch if corrupt.prompts is None else model._batch(corrupt.prompts)
        clean_batch, resampled = paired(model, clean, _deranged(prompts, corrupt.seed, clean_batch))
        return clean_batch.to(model.device), Corruption(resampled.to(model.device), None)
    clean_batch, corrupt_batch = paired(model, clean, corrupt)
    return clean_batch.to(model.device), Corruption(corrupt_batch.to(model.device), None)


def _deranged(prompts: Batch, seed: int, clean: Batch) -> torch.Tensor:
    """`prompts`' tokens in a seeded order in which no prompt keeps its place."""
    n = prompts.tokens.shape[0]
    if n != clean.tokens.shape[0]:
        raise InputError(f"resample ablation needs one prompt per clean prompt: {n} prompts for {clean.tokens.shape[0]} clean ones")
    if n < 2:
        raise InputError("resample ablation needs at least 2 prompts: each prompt's corrupted run is another prompt's")
    lengths = prompts.attention_mask.sum(1)
    if (lengths != lengths[0]).any():
        i = int((lengths != lengths[0]).nonzero()[0])
        raise InputError(
            f"resample ablation runs each prompt with another one's activations, so every prompt needs the same number "
            f"of tokens: prompt 0 has {int(lengths[0])}, prompt {i} has {int(lengths[i])}"
        )
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        if (order != torch.arange(n)).all():
            return prompts.tokens[order.to(prompts.tokens.device)]


def _means(model, clean: Batch, ablation: MeanAblation, n_layers: int) -> dict[str, torch.Tensor]:
    """Each sender hook point's mean over the reference prompts' real tokens, per position or over all of them."""
    from .components import traced_run

    reference = clean if ablation.reference is None else model._batch(ablation.reference).to(model.device)
    length = clean.tokens.shape[1]
    if ablation.per_position and reference.tokens.shape[1] != length:
        raise InputError(
            f"a mean ablation per position needs reference prompts of the clean prompts' {length} positions, got "
            f"{reference.tokens.shape[1]}; give prompts of that length or mean_ablation(..., per_position=False)"
        )
    names = sender_hooks(n_layers)
    with torch.no_grad():
        run = traced_run(model, reference, capture=names, last=True)
    weights = reference.attention_mask.to(model.device)
    means = {}
    for name in names:
        values = run[name]
        w = weights.reshape(*weights.shape, *[1] * (values.dim() - 2)).to(values.dtype)
        if ablation.per_position:
            means[name] = ((values * w).sum(0) / w.sum(0))[None]
        else:
            means[name] = ((values * w).sum((0, 1)) / w.sum((0, 1)))[None, None]
    return means


def _mean_of(mean: torch.Tensor) -> Callable:
    def replace(x, hook):
        return mean.to(x.dtype) + (x - x.detach())

    return replace
