"""The logit lens: what the residual stream after each layer would predict if the model stopped there.

Each layer's `hook_resid_post` (and the embeddings, `blocks.0.hook_resid_pre`, as layer "embed") goes through the
model's own final norm module and the unembedding (`W_U`, `b_U`), giving log-probabilities per layer × position
(nostalgebraist's logit lens). At the last layer this is the model's own output. One prompt at a time: its tokens are
the columns, so a batch would need a view per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..display import Renders
from ..errors import InputError, WeightError

Layer = int | str


def logit_lens(
    model: Any,
    inputs: Any,
    *,
    layers: Sequence[Layer] | None = None,
    positions: int | slice | Sequence[int] | str | None = None,
    top_k: int = 5,
) -> LogitLens:
    """The logit lens of one prompt (`inputs`: a string or the token ids of one prompt) over `layers` (block indices,
    or "embed"; all of them, embeddings first, by default) and `positions` (all by default; negative counts from the
    end; "last" is the last token). `top_k` is how many tokens each cell's hover and `top_tokens` list. The result keeps every log-probability
    (layers × positions × vocabulary floats: choose `positions` for long prompts of large-vocabulary models)."""
    return read_lens(model, inputs, layers, positions, top_k)


def read_lens(
    model: Any,
    inputs: Any,
    layers: Sequence[Layer] | None,
    positions: int | slice | Sequence[int] | str | None,
    top_k: int,
    *,
    translate: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    method: str = "logit lens",
) -> LogitLens:
    """`logit_lens`'s reading, with each layer's residual stream `[position, d_model]` first passed through
    `translate(hook name, stream)` when given (the tuned lens's translators), labelled `method`."""
    norm = final_norm(model)
    unembed, bias = model.weights.W_U, model.weights.b_U
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    n_layers = len(model.weights.blocks)
    chosen = _layers(layers, n_layers)
    names = [layer_hook(layer) for layer in chosen]
    trace = model.run(one_prompt(inputs), capture=names)
    length = trace.tokens.shape[1]
    kept = positions_in(positions, length)
    with torch.no_grad():
        streams = [trace[name][0, kept] for name in names]
        if translate is not None:
            streams = [translate(name, stream) for name, stream in zip(names, streams)]
        streams = torch.stack(streams)  # [layer, position, d_model]
        logits = norm(streams).to(unembed.dtype) @ unembed + bias
    str_tokens = model.to_str_tokens(trace.tokens[0]) if model.tokenizer is not None else [str(t) for t in trace.tokens[0].tolist()]
    return LogitLens(
        logits.float().log_softmax(-1).cpu(),
        [str(layer) for layer in chosen],
        kept,
        [str_tokens[p] for p in kept],
        length,
        model,
        top_k,
        method,
    )


def layer_hook(layer: Layer) -> str:
    """The hook a lens reads at `layer`: `blocks.0.hook_resid_pre` for "embed", else
    `blocks.{layer}.hook_resid_post`."""
    return "blocks.0.hook_resid_pre" if layer == "embed" else f"blocks.{layer}.hook_resid_post"


class LogitLens(Renders):
    """Log-probabilities `.logprobs [layer, position, vocab]` of the logit lens over `.layers` (labels: "embed",
    "0", "1", ...; `.method` says which lens: "logit lens" or "tuned lens") and `.positions` (indices into the prompt of `.length` tokens; their tokens are `.tokens`).

    `.top_tokens(layer, position)`, `.logprob_of(token)`, `.to_numpy()`; renders as a layer × position grid of each
    cell's top token shaded by its probability; `.figure()` is the same as a plotly heatmap.
    """

    def __init__(
        self, logprobs: torch.Tensor, layers: list[str], positions: list[int], tokens: list[str], length: int, model: Any, top_k: int,
        method: str = "logit lens",
    ):
        self.method = method
        self.logprobs = logprobs
        self.length = length
        self.layers = layers
        self.positions = positions
        self.tokens = tokens
        self.top_k = top_k
        self._model = model

    def __repr__(self) -> str:
        what = "" if self.method == "logit lens" else f"{self.method}: "
        return f"LogitLens({what}{len(self.layers)} layers × {len(self.positions)} positions, vocab {self.logprobs.shape[-1]})"

    def to_numpy(self) -> np.ndarray:
        """`.logprobs` as a numpy array `[layer, position, vocab]`."""
        return self.logprobs.numpy()

    def top_tokens(self, layer: Layer, position: int, k: int | None = None) -> list[tuple[str, float]]:
        """The `k` (default `.top_k`) most likely next tokens at `layer` (a block index, negative from the last, or
        "embed") and `position` (an index into the prompt, negative from its end), each with its probability, most
        likely first."""
        row = self.logprobs[self._layer_index(layer), self._position_index(position)]
        values, ids = row.topk(min(k or self.top_k, row.shape[0]))
        return [(self._text(i), float(v.exp())) for v, i in zip(values, ids.tolist())]

    def logprob_of(self, token: int | str) -> torch.Tensor:
        """The log-probability of `token` (an id, or a string of one token) at every layer × position."""
        return self.logprobs[..., token_id(self._model, token, self.logprobs.shape[-1], "the token")]

    def figure(self) -> Any:
        """A plotly heatmap: each cell's top token, coloured by its probability."""
        from .lens_view import lens_figure

        return lens_figure(self)

    def _repr_html_(self) -> str:
        from .lens_view import lens_html

        return lens_html(self)

    def _text(self, token: int) -> str:
        return self._model.to_str_tokens(token)[0] if self._model.tokenizer is not None else str(token)

    def _layer_index(self, layer: Layer) -> int:
        if isinstance(layer, int) and layer < 0:
            layer += len(self._model.weights.blocks)
        if str(layer) not in self.layers:
            raise InputError(f"layer {layer!r} is not in this lens (layers: {', '.join(self.layers)})")
        return self.layers.index(str(layer))

    def _position_index(self, position: int) -> int:
        wanted = position + self.length if position < 0 else position
        if wanted not in self.positions:
            raise InputError(f"position {position} is not in this lens (positions: {self.positions})")
        return self.positions.index(wanted)


def final_norm(model: Any) -> torch.nn.Module:
    """The model's norm on the last residual stream (a WeightError where it has none, or no unembedding)."""
    point = model._points.get("ln_final.hook_normalized")
    if point is None:
        raise WeightError(
            f"this model ({model.architecture} adapter) has no final norm on the residual stream (ln_final.*), so no "
            "logit lens or logit attribution (they need a pre-norm decoder with a language-model head)"
        )
    model.weights.W_U  # a WeightError now, where the model has no unembedding
    return point.module


def one_prompt(inputs: Any) -> Any:
    """`inputs` if it is one prompt (a string, or token ids `[pos]` or `[1, pos]`), else an InputError."""
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, torch.Tensor) and (inputs.dim() == 1 or (inputs.dim() == 2 and inputs.shape[0] == 1)):
        return inputs.reshape(1, -1)
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        return one_prompt(inputs[0]) if isinstance(inputs[0], str) else inputs
    raise InputError("the lens and logit attribution take one prompt at a time (a string or token ids [pos])")


def token_id(model: Any, token: int | str, vocab: int, what: str) -> int:
    """`token` as an id in the vocabulary: an int, or a string that is exactly one token."""
    if isinstance(token, str):
        if model.tokenizer is None:
            raise InputError(f"{what} {token!r} is a string but the model has no tokenizer: give a token id")
        ids = model.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"{what} {token!r} is {len(ids)} tokens, not one: give a single token")
        token = ids[0]
    if isinstance(token, torch.Tensor) and token.numel() == 1:
        token = int(token)
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
        raise InputError(f"{what} {token!r} is not a token id of the vocabulary (0 to {vocab - 1})")
    return token


def positions_in(positions: int | slice | Sequence[int] | str | None, length: int) -> list[int]:
    """`positions` of a prompt of `length` tokens as non-negative indices ("last" is the last token)."""
    if positions is None:
        return list(range(length))
    if positions == "last":
        return [length - 1]
    if isinstance(positions, slice):
        return list(range(length))[positions]
    wanted = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for p in wanted:
        if not isinstance(p, int) or isinstance(p, bool) or not -length <= p < length:
            raise InputError(f"position {p!r} is outside the prompt of {length} tokens")
        out.append(p % length)
    if not out:
        raise InputError("no positions chosen")
    return out


def _layers(layers: Sequence[Layer] | None, n_layers: int) -> list[Layer]:
    if layers is None:
        return ["embed", *range(n_layers)]
    chosen: list[Layer] = []
    for layer in [layers] if isinstance(layers, (int, str)) else layers:
        if layer == "embed":
            chosen.append(layer)
        elif isinstance(layer, int) and not isinstance(layer, bool) and -n_layers <= layer < n_layers:
            chosen.append(layer % n_layers)
        else:
            raise InputError(f"layer {layer!r} is not a block of this {n_layers}-layer model (or 'embed')")
    if not chosen:
        raise InputError("no layers chosen")
    return chosen
