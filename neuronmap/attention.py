"""Attention patterns and head scores: what each head attends to, and which heads do a known job.

`AttentionPatterns` holds `hook_pattern` for some layers of one run, with each prompt's string tokens; it renders
as the attention viewer (static HTML everywhere, a live widget in a kernel). `HeadScores` measures every head
of every layer against one documented definition (`SCORES`) and renders as a layer × head heatmap.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .display import Renders, format_bytes
from .errors import InputError
from .heatmap import heatmap_figure, heatmap_html

if TYPE_CHECKING:
    from .attention_view import ViewChoice
    from .model import Model
    from .trace import Trace

SCORES: dict[str, str] = {
    "previous_token": "mean attention from each token to the token just before it",
    "induction": (
        "mean attention from a token to the tokens that followed its earlier occurrences (summed over them), over "
        "tokens that occurred before; on the standard input, a random sequence repeated twice"
    ),
    "duplicate_token": (
        "mean attention from a token to its own earlier occurrences (summed over them), over tokens that occurred before"
    ),
    "first_token": "mean attention from each token to the prompt's first token (e.g. BOS or [CLS])",
    "distance": "mean distance, in tokens, between a token and what it attends to (attention-weighted)",
    "entropy": "mean entropy, in nats, of each token's attention distribution",
}
"""Every head score NeuronMap computes, by name, with its definition.

All of them are averaged over every query token that has at least one token before it (the first token is
skipped: its attention is trivial in a causal model), pooled over the prompts, padding excluded.
"""

_PATTERN = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


class AttentionPatterns(Renders):
    """Attention probabilities `[prompt, head, query, key]` for some layers of one run, with string tokens.

    `patterns[layer]` is the layer's whole tensor; `patterns[layer, head]` is `[prompt, query, key]`;
    `patterns[layer, head, prompt]` is one prompt's `[query, key]` with padding removed. `.to_numpy()` stacks
    every layer. Scores: `.head_scores("previous_token")`. A layer is named by its number in the model, or counted
    from the end of `.layers` when negative (`patterns[-1]` is the last layer held); heads and prompts index as
    in Python.
    """

    def __init__(
        self,
        patterns: dict[int, torch.Tensor],
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        str_tokens: list[list[str]],
        model_name: str = "model",
    ):
        if not patterns:
            raise InputError("no attention patterns given")
        self._patterns = dict(sorted(patterns.items()))
        self.tokens = tokens.cpu()  # on the CPU whatever the model's device: they index patterns kept anywhere
        self.attention_mask = attention_mask.cpu()
        self.str_tokens = str_tokens
        self.model_name = model_name

    @classmethod
    def from_trace(cls, trace: Trace, layers: Sequence[int] | None = None) -> AttentionPatterns:
        """The patterns a trace captured (`capture="blocks.*.attn.hook_pattern"`), optionally only some layers."""
        found = {int(m.group(1)): trace[name] for name in trace if (m := _PATTERN.match(name))}
        if not found:
            raise InputError(
                "this trace holds no attention patterns: run with capture='blocks.*.attn.hook_pattern' "
                "(or use neuronmap.attention(model, inputs))"
            )
        if layers is not None:
            captured = sorted(found)
            chosen = [_layer_of(layer, captured) for layer in layers]
            missing = [layer for layer, number in zip(layers, chosen) if number is None]
            if missing:
                raise InputError(f"layers {missing} were not captured; captured: {captured} (or -1 to -{len(captured)})")
            found = {number: found[number] for number in chosen}
        return cls(found, trace.tokens, trace.attention_mask, trace.str_tokens, trace.model_name)

    @property
    def layers(self) -> list[int]:
        return list(self._patterns)

    @property
    def n_heads(self) -> int:
        return next(iter(self._patterns.values())).shape[1]

    @property
    def n_prompts(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key: int | tuple) -> torch.Tensor:
        key = key if isinstance(key, tuple) else (key,)
        if not 1 <= len(key) <= 3:
            raise InputError("index attention patterns as [layer], [layer, head] or [layer, head, prompt]")
        pattern = self._patterns[self._layer(key[0])]
        if len(key) == 1:
            return pattern
        if len(key) == 2:
            return pattern[:, self._head(key[1])]
        return self.pattern(*key)

    def pattern(self, layer: int, head: int, prompt: int = 0) -> torch.Tensor:
        """One head's `[query, key]` pattern for one prompt, padding removed."""
        prompt = self._prompt(prompt)
        real = self.attention_mask[prompt].bool()
        return self._patterns[self._layer(layer)][prompt, self._head(head)][real][:, real]

    def _layer(self, layer: int) -> int:
        """The layer number `layer` names: itself when held, counted from the end of `.layers` when negative."""
        found = _layer_of(layer, self.layers)
        if found is None:
            raise InputError(
                f"layer {layer!r} is not in these patterns; layers: {self.layers} (or -1 to -{len(self.layers)}, "
                "counting from the last)"
            )
        return found

    def _head(self, head: int) -> int:
        """`head` as a head number from 0, negative ones counting from the last head as in Python."""
        return _index(head, self.n_heads, "head", "heads")

    def _prompt(self, prompt: int) -> int:
        """`prompt` as a prompt number from 0, negative ones counting from the last prompt as in Python."""
        return _index(prompt, self.n_prompts, "prompt", "prompts")

    def to_numpy(self) -> np.ndarray:
        """Every layer stacked: `[layer, prompt, head, query, key]` (float32; padded positions hold zeros)."""
        return torch.stack([p.detach().float().cpu() for p in self._patterns.values()]).numpy()

    def head_scores(self, kind: str) -> HeadScores:
        """Score every head of these layers by one of `SCORES` (see there for the definitions)."""
        return HeadScores(kind, _score(self, kind), self.layers, self.model_name, self.tokens.shape)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._patterns.values())

    def __repr__(self) -> str:
        return (
            f"AttentionPatterns({self.model_name!r}, {len(self.layers)} layers × {self.n_heads} heads, "
            f"{self.n_prompts} prompt{'s' if self.n_prompts != 1 else ''} × {self.tokens.shape[1]} tokens, "
            f"{format_bytes(self.nbytes)})"
        )

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.view()._repr_mimebundle_()

    def view(
        self,
        layer: int | None = None,
        heads: Sequence[int] = (0,),
        prompt: int | None = None,
        *,
        layers: Sequence[int] | None = None,
        prompts: Sequence[int] | None = None,
        budget: int | None = None,
    ) -> AttentionView:
        """The viewer opened on `layer` (default: the first), `heads` and `prompt` (default: the first).

        Static HTML everywhere, a widget in a live kernel. The static form (exports, `save_html`) embeds at most
        `budget` bytes of attention data (default `attention_view.STATIC_BUDGET`, 1.5 MB: the page stays under
        2 MB): the `prompts` chosen (default: the opened one; several get a prompt switch) and the `layers`
        chosen (default: as many as fit, from `layer` on). When even those do not fit at full length it shows
        each prompt's first tokens and says so; a larger `budget`, fewer layers or prompts show more.
        """
        from .attention_view import resolve_view

        return AttentionView(self, resolve_view(self, layer, heads, prompt, layers, prompts, budget))

    def save_html(
        self,
        path: str | os.PathLike,
        layer: int | None = None,
        heads: Sequence[int] = (0,),
        prompt: int | None = None,
        *,
        layers: Sequence[int] | None = None,
        prompts: Sequence[int] | None = None,
        budget: int | None = None,
    ) -> None:
        """Write the static viewer to `path` as a page that needs no network; the options are `view`'s."""
        self.view(layer, heads, prompt, layers=layers, prompts=prompts, budget=budget).save_html(path)

    def widget(self, layer: int | None = None, heads: Sequence[int] = (0,), prompt: int = 0):
        """The live viewer (an anywidget): choose layer, heads and prompt; hover or click tokens."""
        from .attention_view import AttentionWidget

        return AttentionWidget(self, layer=self.layers[0] if layer is None else layer, heads=heads, prompt=prompt)


class AttentionView(Renders):
    """What displaying `AttentionPatterns` shows: its static view, plus the live widget where a front end can run it."""

    def __init__(self, patterns: AttentionPatterns, choice: ViewChoice):
        self.patterns, self.choice = patterns, choice
        self.layer, self.heads, self.prompt = choice.layer, choice.heads, choice.prompt

    def __repr__(self) -> str:
        embeds = [f"layers {self.choice.layers}"] if self.choice.layers is not None else []
        embeds += [f"prompts {self.choice.prompts}"] if len(self.choice.prompts) > 1 else []
        static = f" (static view: {', '.join(embeds)})" if embeds else ""
        return f"{self.patterns!r} — layer {self.layer}, heads {self.heads}, prompt {self.prompt}{static}"

    def _repr_html_(self) -> str:
        from .attention_view import static_html

        return static_html(self.patterns, self.choice)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        from .widget import mimebundle

        return mimebundle(self, lambda: self.patterns.widget(self.layer, self.heads, self.prompt))


class HeadScores(Renders):
    """One score for every head: `.values[i, head]` for `.layers[i]`; `.top(k)`; a heatmap as its view."""

    def __init__(self, kind: str, values: torch.Tensor, layers: Sequence[int], model_name: str, input_shape: Sequence[int]):
        self.kind = kind
        self.definition = SCORES[kind]
        self.values = values
        self.layers = list(layers)
        self.model_name = model_name
        self.input_shape = tuple(input_shape)

    def __getitem__(self, layer_head: tuple[int, int]) -> float:
        """The score of `(layer, head)`; a negative layer counts from the end of `.layers`, a negative head as in Python."""
        layer, head = layer_head
        found = _layer_of(layer, self.layers)
        if found is None:
            raise InputError(f"layer {layer!r} was not scored; layers: {self.layers} (or -1 to -{len(self.layers)})")
        return float(self.values[self.layers.index(found), _index(head, self.values.shape[1], "head", "heads")])

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The `k` highest-scoring heads as `(layer, head, score)`, best first (for `distance`/`entropy`: largest)."""
        flat = self.values.flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:k]
        n_heads = self.values.shape[1]
        return [(self.layers[int(i) // n_heads], int(i) % n_heads, float(flat[i])) for i in order]

    def to_numpy(self) -> np.ndarray:
        return self.values.numpy()

    def figure(self):
        """A plotly heatmap, layers down and heads across (white to blue, as the HTML view)."""
        return heatmap_figure(
            self.values, self.layers, range(self.values.shape[1]),
            title=f"{self.kind} score — {self.model_name}", row_title="layer", column_title="head", diverging=False,
        )

    def __repr__(self) -> str:
        best = ", ".join(f"{layer}.{head} {score:.2f}" for layer, head, score in self.top(3))
        return (
            f"HeadScores({self.kind!r}, {self.model_name!r}, {len(self.layers)} layers × {self.values.shape[1]} heads; "
            f"top: {best})"
        )

    def _repr_html_(self) -> str:
        return heatmap_html(
            self.values, self.layers, range(self.values.shape[1]),
            title=f"{self.kind} score per head — {self.model_name}", description=self.definition,
            row_title="layer", column_title="head", diverging=False,
        )


def attention(
    model: Model, inputs: Any, *, layers: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None
) -> AttentionPatterns:
    """Run `model` on `inputs` and return the attention patterns of `layers` (all by default; -1 is the last)."""
    if layers is None:
        names: str | list[str] = "blocks.*.attn.hook_pattern"
    else:
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in _model_layers(model, layers)]
    trace = model.run(inputs, capture=names, attention_mask=attention_mask, capture_device="cpu")
    return AttentionPatterns.from_trace(trace)


def head_scores(
    model: Model,
    kind: str,
    inputs: Any = None,
    *,
    length: int | None = None,
    batch: int = 8,
    seed: int = 0,
) -> HeadScores:
    """Score every head of `model` by `kind` (one of `SCORES`).

    With `inputs=None` the scores are measured on the standard construction: `batch` sequences of a start token
    and `length` random tokens repeated twice (drawn from `seed`), on which a previous-token head attends one
    back and an induction head attends to the token after the current token's first copy.
    """
    _check_kind(kind)
    if inputs is None:
        inputs = repeated_random_tokens(model, length=length, batch=batch, seed=seed)
    return attention(model, inputs).head_scores(kind)


def repeated_random_tokens(model: Model, *, length: int | None = None, batch: int = 8, seed: int = 0) -> torch.Tensor:
    """`[batch, 1 + 2 * length]` token ids: a start token, then `length` random non-special tokens, twice."""
    config = getattr(model.module, "config", None)
    if config is None:
        raise InputError("repeated_random_tokens needs a Hugging Face model (it reads the vocabulary size)")
    limit = model._max_length or 1025
    length = min(50, (limit - 1) // 2) if length is None else length
    if length < 1 or 1 + 2 * length > limit:
        raise InputError(f"length must be between 1 and {(limit - 1) // 2} for this model, got {length}")
    allowed = torch.ones(config.vocab_size, dtype=torch.bool)
    allowed[[i for i in getattr(model.tokenizer, "all_special_ids", None) or [] if i < config.vocab_size]] = False
    candidates = allowed.nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    segment = candidates[torch.randint(len(candidates), (batch, length), generator=generator)]
    start = _start_token(model)
    return torch.cat([torch.full((batch, 1), start), segment, segment], dim=1)


def _model_layers(model: Model, layers: Sequence[int]) -> list[int]:
    """`layers` with negative ones counted from the model's last layer that has attention patterns."""
    if all(_integer(layer, "layer") >= 0 for layer in layers):
        return list(layers)
    held = sorted(int(m.group(1)) for name in model.hook_names if (m := _PATTERN.match(name)))
    resolved = [_layer_of(layer, held) for layer in layers]
    if None in resolved:
        raise InputError(f"layers {list(layers)}: this model's attention layers are {held} (or -1 to -{len(held)})")
    return resolved


def _layer_of(layer: int, layers: Sequence[int]) -> int | None:
    """The layer number `layer` names among the sorted `layers`: itself if held, from the end if negative, else None."""
    index = _integer(layer, "layer")
    if index in layers:
        return index
    return layers[index] if -len(layers) <= index < 0 else None


def _index(value: int, count: int, what: str, plural: str) -> int:
    """`value` as an index from 0 into `count` things, a negative one counting from the end as in Python."""
    index = _integer(value, what)
    if not -count <= index < count:
        raise InputError(f"{what} {value!r} out of range: there are {count} {plural}")
    return index % count


def _integer(value: Any, what: str) -> int:
    """`value` as a Python int (ints, NumPy and 0-d tensor integers), or an InputError naming `what`."""
    try:
        return operator.index(value)
    except TypeError:
        raise InputError(f"{what} must be an integer, got {value!r}") from None


def _start_token(model: Model) -> int:
    tokenizer, config = model.tokenizer, model.module.config
    for source in (tokenizer, config):
        for attribute in ("bos_token_id", "cls_token_id"):
            value = getattr(source, attribute, None)
            if isinstance(value, int):
                return value
    return 0


def _check_kind(kind: str) -> None:
    if kind not in SCORES:
        import difflib

        close = difflib.get_close_matches(kind, SCORES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown head score {kind!r}{hint} Available: {', '.join(SCORES)}")


def _score(patterns: AttentionPatterns, kind: str) -> torch.Tensor:
    """`[layer, head]` scores pooled over every qualifying query of every prompt (see `SCORES`).

    One layer of one prompt is in float32 at a time, so scoring long prompts does not copy every pattern.
    """
    _check_kind(kind)
    total = torch.zeros(len(patterns.layers), patterns.n_heads)
    count = 0
    for prompt in range(patterns.n_prompts):
        real = patterns.attention_mask[prompt].bool()
        tokens = patterns.tokens[prompt][real].cpu()
        n = tokens.shape[0]
        if kind == "entropy":
            queries, weights = torch.arange(n) >= 1, None
        else:
            weights = _key_weights(kind, tokens)  # [n, n]
            queries = weights.sum(-1) > 0 if kind in ("induction", "duplicate_token") else torch.arange(n) >= 1
        for index, layer in enumerate(patterns.layers):
            rows = patterns[layer][prompt][:, real][:, :, real][:, queries].float().cpu()  # [head, query, key]
            if weights is None:
                total[index] += -(rows * torch.log(rows.clamp_min(1e-30))).sum(dim=(-1, -2))
            else:
                total[index] += (rows * weights[queries]).sum(dim=(-1, -2))
        count += int(queries.sum())
    if count == 0:
        raise InputError(
            f"no token in these prompts qualifies for the {kind!r} score (it needs tokens that occurred before); "
            "use neuronmap.head_scores(model, kind) for the standard repeated-random-token input"
        )
    return total / count


def _key_weights(kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """For each query row, the weight each key gets in the score (see `SCORES`)."""
    n = tokens.shape[0]
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if kind == "previous_token":
        return (key == query - 1).float()
    if kind == "first_token":
        return (key == 0).expand(n, n).float()
    if kind == "distance":
        return (query - key).abs().float()
    earlier = key < query
    if kind == "duplicate_token":
        return (earlier & (tokens[None, :] == tokens[:, None])).float()
    # induction: key j follows an earlier copy of the query's token (tokens[j - 1] == tokens[i], 1 <= j < i)
    before_key = torch.cat([tokens.new_full((1,), -1), tokens[:-1]])
    return (earlier & (key >= 1) & (before_key[None, :] == tokens[:, None])).float()
