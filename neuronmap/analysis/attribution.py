"""Direct logit attribution: how much each component writes the answer's logit (or a logit difference) directly.

The residual stream before the final norm is a sum of component outputs: the token and position embeddings, each
head's `attn.hook_result`, each attention layer's output bias `b_O`, each MLP's `hook_mlp_out`. With the final norm's
scale frozen at its value in the clean run (as TransformerLens's `cache.apply_ln_to_stack`: subtract the mean, divide
by `ln_final.hook_scale`, times the norm's weight; an RMSNorm does not subtract the mean), the norm is linear, so each
component's image dotted with `W_U[:, answer]` (minus `W_U[:, wrong]`) is its direct effect, and these, plus the
norm's bias and `b_U` terms, sum to the clean logit (difference). One prompt at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..display import Renders
from ..errors import InputError
from ..heatmap import heatmap_figure, heatmap_html
from .lenses import final_norm, one_prompt, positions_in, token_id


def direct_logit_attribution(
    model: Any,
    inputs: Any,
    answer: int | str,
    *,
    wrong: int | str | None = None,
    position: int | str = -1,
    per_position: bool = False,
) -> LogitAttribution:
    """The direct effect of every component on the logit of `answer` (minus that of `wrong`, when given) at
    `position` (an index, negative from the end, or "last") of one prompt.

    `answer` and `wrong` are token ids or strings of exactly one token. The result's `.values` (with `.labels`)
    hold every component and the two bias terms; they sum to `.logit`, the clean run's logit (difference).
    `per_position=True` also splits each head's term over the source positions it attends to (`.head_positions
    [layer, head, source position]`: the attention weight times that position's value through `W_O`, frozen norm
    and direction), which sum over positions to the head's term.
    """
    norm = final_norm(model)
    weights = model.weights
    vocab = weights.W_U.shape[1]
    answer_id = token_id(model, answer, vocab, "the answer")
    wrong_id = None if wrong is None else token_id(model, wrong, vocab, "the wrong answer")
    if not (isinstance(position, int) and not isinstance(position, bool)) and position != "last":
        raise InputError(f"position must be one token index or 'last', got {position!r}")
    embeds = [name for name in ("hook_embed", "hook_pos_embed") if name in model.hook_names]
    n_layers = len(weights.blocks)
    layers = range(n_layers)
    capture = [*embeds, "ln_final.hook_scale"]
    hooks = ("attn.hook_result", "hook_mlp_out") + (("attn.hook_pattern", "attn.hook_v") if per_position else ())
    capture += [f"blocks.{layer}.{hook}" for layer in layers for hook in hooks]
    trace = model.run(one_prompt(inputs), capture=capture)
    (p,) = positions_in(position, trace.tokens.shape[1])

    direction, bias_U = _direction(weights, answer_id, wrong_id)
    effect, ln_bias = _frozen_norm(model, norm, trace["ln_final.hook_scale"][0, p], direction)

    labels, values = [], []
    for name, label in zip(embeds, ("embed", "pos_embed")):
        labels.append(label)
        values.append(effect(trace[name][0, p]))
    heads = torch.stack([effect(trace[f"blocks.{layer}.attn.hook_result"][0, p]) for layer in layers])
    b_O = weights.b_O
    for layer in layers:
        labels += [f"L{layer}H{head}" for head in range(heads.shape[1])] + [f"L{layer} attn bias", f"L{layer} mlp"]
        values += [*heads[layer], effect(b_O[layer]), effect(trace[f"blocks.{layer}.hook_mlp_out"][0, p])]
    head_positions = None
    if per_position:
        head_positions = torch.stack([_per_source(trace, weights, layer, p, effect) for layer in layers]).float()
    labels += ["ln_final bias", "unembed bias"]
    values += [ln_bias, bias_U]
    logits = trace.logits[0, p].double()
    logit = logits[answer_id] - (logits[wrong_id] if wrong_id is not None else 0)
    tokens = model.to_str_tokens(trace.tokens[0]) if model.tokenizer is not None else None
    what = _describe(model, answer_id, wrong_id, p, tokens)
    tokens = tokens or [str(t) for t in trace.tokens[0].tolist()]
    return LogitAttribution(torch.stack(values).float(), labels, heads.float(), float(logit), what, head_positions, tokens)


class LogitAttribution(Renders):
    """Direct logit attribution of one prompt at one position.

    `.values [component]` with `.labels` ("embed", "pos_embed", "L0H3", "L0 attn bias", "L0 mlp", ...,
    "ln_final bias", "unembed bias"), summing to `.logit` (the clean logit or logit difference); `.heads
    [layer, head]` the heads' values as a grid; `.head_positions [layer, head, source position]` (None unless
    asked for) splits them over the positions of the prompt (`.tokens`). `.top(k)`, `.to_numpy()`; renders as a
    layer × head heatmap and a column of the other components (and the split, when asked for); `.figure()` is the
    heads' heatmap in plotly.
    """

    def __init__(
        self,
        values: torch.Tensor,
        labels: list[str],
        heads: torch.Tensor,
        logit: float,
        description: str,
        head_positions: torch.Tensor | None,
        tokens: list[str],
    ):
        self.values = values
        self.head_positions = head_positions
        self.tokens = tokens
        self.labels = labels
        self.heads = heads
        self.logit = logit
        self.description = description

    def __repr__(self) -> str:
        return f"LogitAttribution({self.description}: {len(self.labels)} terms, logit {self.logit:.4g})"

    def to_numpy(self) -> np.ndarray:
        """`.values` as a numpy array (in the order of `.labels`)."""
        return self.values.numpy()

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` components (bias terms included) with the largest |direct effect|, largest first."""
        order = self.values.abs().argsort(descending=True)[:k].tolist()
        return [(self.labels[i], float(self.values[i])) for i in order]

    def figure(self) -> Any:
        """A plotly layer × head heatmap of the heads' direct effects (the other components are in `.top`)."""
        n_layers, n_heads = self.heads.shape
        return heatmap_figure(
            self.heads, [str(layer) for layer in range(n_layers)], [str(head) for head in range(n_heads)],
            title=f"direct logit attribution of each head: {self.description}", row_title="layer",
            column_title="head", diverging=True,
        )

    def _repr_html_(self) -> str:
        n_layers, n_heads = self.heads.shape
        head_labels = {f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)}
        others = [i for i, label in enumerate(self.labels) if label not in head_labels]
        heads = heatmap_html(
            self.heads, [str(layer) for layer in range(n_layers)], [str(head) for head in range(n_heads)],
            title=f"direct logit attribution: {self.description}", row_title="layer", column_title="head",
            diverging=True, description=f"each head's direct effect; all terms sum to {self.logit:.4g}",
        )
        rest = heatmap_html(
            self.values[others][:, None], [self.labels[i] for i in others], ["direct effect"],
            title="other components and bias terms", row_title="component", column_title="term", diverging=True,
        )
        split = ""
        if self.head_positions is not None:
            split = heatmap_html(
                self.head_positions.flatten(0, 1), [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)],
                [f"{i} {token}" for i, token in enumerate(self.tokens)], title="each head's term by source position",
                row_title="head", column_title="source position", diverging=True,
            )
        return f"<div>{heads}{rest}{split}</div>"


def _direction(weights: Any, answer: int, wrong: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unembedding direction `W_U[:, answer] - W_U[:, wrong]` and its bias term, in float64."""
    direction, bias = weights.W_U[:, answer].double(), weights.b_U[answer].double()
    if wrong is not None:
        direction, bias = direction - weights.W_U[:, wrong].double(), bias - weights.b_U[wrong].double()
    return direction, bias


def _frozen_norm(model: Any, norm: torch.nn.Module, scale: torch.Tensor, direction: torch.Tensor):
    """`effect(stack [..., d_model]) -> [...]`: the final norm with the clean run's `scale` frozen (centring first
    for a LayerNorm), then dotted with `direction`; and the norm's bias term (0 where it has no bias)."""
    centred = model._points["ln_final.hook_scale"].derived.centred
    scale = scale.double()
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    weight = weight.detach().double() if weight is not None else torch.ones_like(direction)
    bias_term = bias.detach().double() @ direction if bias is not None else direction.new_zeros(())

    def effect(stack: torch.Tensor) -> torch.Tensor:
        stack = stack.double()
        stack = stack - stack.mean(-1, keepdim=True) if centred else stack
        return (stack / scale * weight) @ direction

    return effect, bias_term


def _per_source(trace: Any, weights: Any, layer: int, position: int, effect: Any) -> torch.Tensor:
    """`[head, source position]`: each head's term at `position` split over the positions it reads, pattern × (value
    through `W_O`), repeating key-value heads for their query heads under grouped-query attention."""
    pattern = trace[f"blocks.{layer}.attn.hook_pattern"][0, :, position].double()  # [head, source]
    values = trace[f"blocks.{layer}.attn.hook_v"][0].double()  # [source, kv head, d_head]
    W_O = weights.blocks[layer].attn.W_O.double()  # [head, d_head, d_model]
    values = values.repeat_interleave(W_O.shape[0] // values.shape[1], dim=1)
    written = torch.einsum("hs,shd,hdm->hsm", pattern, values, W_O)
    return effect(written)


def _describe(model: Any, answer: int, wrong: int | None, position: int, tokens: list[str] | None) -> str:
    def text(token: int) -> str:
        return repr(model.to_str_tokens(token)[0]) if model.tokenizer is not None else str(token)

    target = f"logit of {text(answer)}" if wrong is None else f"logit difference {text(answer)} − {text(wrong)}"
    where = f"position {position}" + (f" ({tokens[position]!r})" if tokens else "")
    return f"{target} at {where}"
