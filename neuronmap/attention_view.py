"""The attention viewer's data for the browser: 8-bit square-root-quantised patterns, deflated, a layer at a time.

Both views run the front end in `widgets/attention.js`. The live widget sends thumbnails of every head of every
layer at once and the selected layer's full patterns on demand. The static view embeds, within a byte budget,
the layers and prompts it was asked for (by default: one prompt, and as many layers as fit from the opened one
on); it keeps fewer tokens, saying so and which argument shows more, when what was asked for does not fit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .display import escape
from .errors import InputError
from .widget import b64, front_end, pack, static_page

if TYPE_CHECKING:
    from .attention import AttentionPatterns

THUMB_SIZE = 48
STATIC_BUDGET = 1_500_000
"""Most base64 characters of attention data (patterns and thumbnails) a static view embeds unless told otherwise.

With it the page stays under 2 MB; `view(..., budget=...)` and `save_html(..., budget=...)` choose another.
"""
_MIN_TOKENS = 16
"""A static view keeps at least this many tokens of each prompt, whatever its budget."""
_PROBE_TOKENS = 128
"""A static view first encodes this many tokens, to learn how well these patterns compress."""
_FIT_STEPS = 6
"""Most sizes a static view tries before it settles on a number of tokens."""
_COMPRESSION = 16
"""Deflate shrinks attention patterns by less than this, so a view never tries more tokens than
sqrt(_COMPRESSION * budget / heads): beyond them not even one layer could fit, and quantising them costs time."""
_FALLBACK_TOKENS = 200
_FALLBACK_HINT = "To see the interactive viewer, run this cell, or trust the notebook (File \u2192 Trust Notebook)."
"""What shows where the view's script did not run: an untrusted notebook, or a page without JavaScript."""


def quantise(pattern: torch.Tensor) -> bytes:
    """Attention probabilities as bytes of round(255 * sqrt(p)), row-major.

    Square-root steps keep diffuse attention: p = 1/1000 becomes 8, where linear steps (round(255 * p)) give 0
    for every p below 1/510, blanking the spread-out heads of long prompts.
    """
    return (pattern.detach().float().clamp(0, 1).sqrt() * 255).round().to(torch.uint8).cpu().numpy().tobytes()


def layer_block(patterns: AttentionPatterns, layer: int, prompt: int, n: int | None = None) -> torch.Tensor:
    """One layer's `[head, query, key]` for one prompt, padding removed, cut to the first `n` tokens.

    Only the kept rows and columns are copied, so a short cut of a long prompt costs little.
    """
    keep = patterns.attention_mask[prompt].nonzero().flatten()[:n]
    return patterns[layer][prompt][:, keep][:, :, keep]


def thumbnails(patterns: AttentionPatterns, prompt: int, layers: Sequence[int], n: int | None = None) -> tuple[bytes, int]:
    """Max-pooled `[layer, head, T, T]` thumbnails (bytes) and T, so thin diagonals stay visible."""
    blocks = [layer_block(patterns, layer, prompt, n).float() for layer in layers]
    size = min(THUMB_SIZE, blocks[0].shape[-1])
    pooled = [F.adaptive_max_pool2d(block[None], size)[0] for block in blocks]
    return quantise(torch.stack(pooled)), size


@dataclass(frozen=True)
class ViewChoice:
    """What a view shows: the layer, heads and prompt it opens on; what its static form embeds, within `budget`.

    `layers` None embeds as many layers as fit, from `layer` on; `prompts` always holds `prompt`.
    """

    layer: int
    heads: list[int]
    prompt: int
    layers: list[int] | None
    prompts: list[int]
    budget: int


def resolve_view(
    patterns: AttentionPatterns,
    layer: int | None = None,
    heads: Sequence[int] = (0,),
    prompt: int | None = None,
    layers: Sequence[int] | None = None,
    prompts: Sequence[int] | None = None,
    budget: int | None = None,
) -> ViewChoice:
    """What a view asks for as layer, head and prompt numbers (negative ones counted from the end), checked.

    Refuses a layer, head or prompt that the patterns do not have, naming what they do have, an opened layer or
    prompt that the chosen `layers` or `prompts` leave out, and a budget that is not a positive number of bytes.
    """
    bad = [head for head in heads if head not in range(-patterns.n_heads, patterns.n_heads)]
    if bad:
        raise InputError(f"heads {bad} out of range: there are {patterns.n_heads} heads")
    chosen_layers = None if layers is None else _chosen(layers, patterns._layer, "layers")
    chosen_prompts = None if prompts is None else _chosen(prompts, patterns._prompt, "prompts")
    layer = patterns._layer((chosen_layers or patterns.layers)[0] if layer is None else layer)
    prompt = patterns._prompt((chosen_prompts or [0])[0] if prompt is None else prompt)
    if chosen_layers is not None and layer not in chosen_layers:
        raise InputError(f"layer {layer} is not among layers={chosen_layers}, the layers this view embeds")
    if chosen_prompts is not None and prompt not in chosen_prompts:
        raise InputError(f"prompt {prompt} is not among prompts={chosen_prompts}, the prompts this view embeds")
    budget = STATIC_BUDGET if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, Real) or not budget >= 1:
        raise InputError(f"budget must be a positive number of bytes, got {budget!r}")
    heads = sorted({patterns._head(head) for head in heads})
    return ViewChoice(layer, heads, prompt, chosen_layers, chosen_prompts or [prompt], int(budget))


def _chosen(values: Sequence[int], resolve: Callable[[int], int], what: str) -> list[int]:
    """Layer or prompt numbers, sorted and each once; an empty choice is refused."""
    if isinstance(values, (int, str)) or not values:
        raise InputError(f"{what} must be a non-empty list, got {values!r}")
    return sorted({resolve(value) for value in values})


def static_html(patterns: AttentionPatterns, choice: ViewChoice) -> str:
    """The self-contained static view: `choice`'s prompts and layers within its budget (see `ViewChoice`)."""
    data, notes = static_data(patterns, choice)
    return static_page("attention", data, _fallback(patterns, _prompt_tokens(patterns, choice.prompt), notes))


def static_data(patterns: AttentionPatterns, choice: ViewChoice) -> tuple[dict, list[str]]:
    """What the front end's static model is built from (`staticModel(data)` in `widgets/attention.js`), and the
    notes it shows: `choice`'s prompts and layers within its budget.

    Tokens are cut to the first `n` of each prompt only when what must be embedded (the chosen layers, or
    else the opened one) does not fit at full length; the note says so and which argument shows more.
    """
    fit = _fit(patterns, choice)
    layers = sorted(fit.layers)
    views = {}
    for prompt in choice.prompts:
        tokens = _prompt_tokens(patterns, prompt)
        thumbs, size = thumbnails(patterns, prompt, layers, fit.n)
        views[str(prompt)] = {"tokens": tokens[: fit.n], "n_total": len(tokens), "thumb_size": size, "thumbs": b64(thumbs)}
    notes = _notes(patterns, choice, fit)
    data = {
        "layers": layers,
        "n_heads": patterns.n_heads,
        "layer": choice.layer,
        "heads": choice.heads,
        "prompt": choice.prompt,
        "prompts": choice.prompts,
        "views": views,
        "details": fit.details,
        "note": " · ".join(notes),
    }
    return data, notes


def prompt_state(patterns: AttentionPatterns, prompt: int) -> dict:
    """A live view's fields for `prompt`: its tokens, every layer's thumbnails and the note."""
    tokens = _prompt_tokens(patterns, prompt)
    thumbs, size = thumbnails(patterns, prompt, patterns.layers)
    note = f"{patterns.model_name} · {len(patterns.layers)} layers × {patterns.n_heads} heads · {len(tokens)} tokens"
    return {"tokens": tokens, "n_total": len(tokens), "thumbs": thumbs, "thumb_size": size, "note": note}


def detail_state(patterns: AttentionPatterns, layer: int, prompt: int) -> dict:
    """A live view's fields for one layer of one prompt: its full patterns, deflated, and their key."""
    return {"detail": pack(quantise(layer_block(patterns, layer, prompt))), "detail_key": f"{layer}:{prompt}"}


@dataclass
class _Fit:
    """What fits a static view's budget: the first `n` tokens of each prompt, for `layers`, as encoded `details`."""

    n: int
    layers: list[int]
    details: dict[str, str]
    size: int
    longest: int


def _fit(patterns: AttentionPatterns, choice: ViewChoice) -> _Fit:
    """The most tokens at which what must be embedded fits, then as many more layers as fit too, in order.

    What must be embedded is the chosen layers, or the opened layer when none were chosen. Its size grows about
    as the square of the tokens, which predicts the next number of tokens to try from the last; the tries stay
    between the most tokens known to fit and the fewest known not to, and stop within 5% of the budget.
    """
    longest = max(len(_prompt_tokens(patterns, prompt)) for prompt in choice.prompts)
    ceiling = min(longest, max(_MIN_TOKENS, math.isqrt(_COMPRESSION * choice.budget // patterns.n_heads)))
    required = choice.layers or [choice.layer]
    fits, fits_not = _MIN_TOKENS - 1, ceiling + 1
    best = None
    n = min(ceiling, _PROBE_TOKENS)
    for _ in range(_FIT_STEPS):
        fit = _encode(patterns, choice, required, n, longest)
        if fit.size <= choice.budget:
            fits, best = n, fit
            if n == ceiling or fit.size >= 0.95 * choice.budget:
                break
        else:
            fits_not = n
        n = min(max(int(n * 0.98 * math.sqrt(choice.budget / fit.size)), fits + 1), fits_not - 1)
        if n <= fits:
            break
    if best is None:  # not even the fewest tokens fit: keep those anyway
        best = _encode(patterns, choice, required, _MIN_TOKENS, longest)
    if choice.layers is None:
        start = patterns.layers.index(choice.layer)
        for layer in patterns.layers[start + 1 :] + patterns.layers[:start]:
            if not _add_layer(patterns, choice, best, layer, limit=choice.budget):
                break
    return best


def _encode(patterns: AttentionPatterns, choice: ViewChoice, layers: list[int], n: int, longest: int) -> _Fit:
    """`layers` at the first `n` tokens of every chosen prompt, whatever their size."""
    fit = _Fit(n, [], {}, 0, longest)
    for layer in layers:
        _add_layer(patterns, choice, fit, layer)
    return fit


def _add_layer(patterns: AttentionPatterns, choice: ViewChoice, fit: _Fit, layer: int, limit: float = math.inf) -> bool:
    """Add `layer`'s patterns (and the room its thumbnails take) for every chosen prompt to `fit`, if within `limit`."""
    details, size = {}, 0
    for prompt in choice.prompts:
        encoded = b64(pack(quantise(layer_block(patterns, layer, prompt, fit.n))))
        side = min(THUMB_SIZE, fit.n, len(_prompt_tokens(patterns, prompt)))
        details[f"{layer}:{prompt}"] = encoded
        size += len(encoded) + 4 * math.ceil(patterns.n_heads * side * side / 3)
    if fit.size + size > limit:
        return False
    fit.layers.append(layer)
    fit.details.update(details)
    fit.size += size
    return True


def _notes(patterns: AttentionPatterns, choice: ViewChoice, fit: _Fit) -> list[str]:
    """What the static view shows, what it left out, and which argument of `view`/`save_html` shows more."""
    notes = [f"{patterns.model_name} · static view"]
    if len(choice.prompts) < patterns.n_prompts:
        shown = f"prompt {choice.prompts[0]}" if len(choice.prompts) == 1 else f"prompts {_spans(choice.prompts)}"
        notes.append(
            f"{shown} of {patterns.n_prompts} embedded (prompts=[...] chooses which, "
            f"prompts=range({patterns.n_prompts}) embeds all)"
        )
    cut = []
    if fit.n < fit.longest:
        cut.append(f"showing the first {fit.n} of {fit.longest} tokens")
    all_layers = choice.layers or patterns.layers
    if len(fit.layers) < len(all_layers):
        cut.append(f"layers {_spans(sorted(fit.layers))} of {_spans(all_layers)} embedded")
    if cut:
        # size grows as the square of the tokens and in proportion to the layers; a tenth more for the estimate
        everything = fit.size * (fit.longest / min(fit.n, fit.longest)) ** 2 * len(all_layers) / len(fit.layers) * 1.1
        notes.append(
            f"{' and '.join(cut)} (size limit {_size(choice.budget)}: budget={_round_up(everything):_} embeds all of "
            "them, layers=[...] chooses which layers; the live widget shows everything)"
        )
    return notes


def _size(n: int) -> str:
    """A byte count as the notes show it: 1.5 MB, 60 kB, 900 bytes (MB = 10^6 bytes, as the budget counts)."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB" if n >= 1_000 else f"{n} bytes"


def _round_up(size: float) -> int:
    """`size` rounded up to two significant digits: 4_812_345.6 becomes 4_900_000."""
    step = 10 ** max(0, math.floor(math.log10(max(size, 1))) - 1)
    return math.ceil(size / step) * step


def _spans(numbers: list[int]) -> str:
    """Sorted numbers as runs: [0, 1, 2, 5] becomes "0–2, 5"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}" for run in runs)


def _fallback(patterns: AttentionPatterns, tokens: list[str], notes: list[str]) -> str:
    """What shows where scripts do not run: what the view is, and the tokens as escaped text."""
    shown = " ".join(f"[{escape(token)}]" for token in tokens[:_FALLBACK_TOKENS])
    more = f" … {len(tokens) - _FALLBACK_TOKENS} more" if len(tokens) > _FALLBACK_TOKENS else ""
    return (
        f'<div class="nm-fallback"><div>{escape(repr(patterns))}</div><div>{escape(" · ".join(notes))}</div>'
        f"<div>{shown}{more}</div><div>{escape(_FALLBACK_HINT)}</div></div>"
    )


def _prompt_tokens(patterns: AttentionPatterns, prompt: int) -> list[str]:
    return list(patterns.str_tokens[prompt])


@functools.cache
def _widget_class():
    import anywidget
    import traitlets

    script, css = front_end("attention")

    class AttentionWidget(anywidget.AnyWidget):
        """The live attention viewer: thumbnails of every head up front, a layer's full patterns on demand."""

        _esm = script
        _css = css
        layers = traitlets.List(traitlets.Int()).tag(sync=True)
        n_heads = traitlets.Int().tag(sync=True)
        layer = traitlets.Int().tag(sync=True)
        heads = traitlets.List(traitlets.Int()).tag(sync=True)
        prompt = traitlets.Int(0).tag(sync=True)
        prompts = traitlets.List(traitlets.Int()).tag(sync=True)
        tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
        n_total = traitlets.Int().tag(sync=True)
        thumb_size = traitlets.Int().tag(sync=True)
        thumbs = traitlets.Bytes().tag(sync=True)
        detail = traitlets.Bytes().tag(sync=True)
        detail_key = traitlets.Unicode().tag(sync=True)
        note = traitlets.Unicode().tag(sync=True)

        def __init__(self, patterns: AttentionPatterns, *, layer: int, heads: Sequence[int], prompt: int):
            choice = resolve_view(patterns, layer, heads, prompt)
            self._patterns = patterns
            super().__init__(
                layers=patterns.layers,
                n_heads=patterns.n_heads,
                layer=choice.layer,
                heads=choice.heads,
                prompts=list(range(patterns.n_prompts)),
                prompt=choice.prompt,
                **prompt_state(patterns, choice.prompt),
                **detail_state(patterns, choice.layer, choice.prompt),
            )
            self.observe(self._on_layer, names="layer")
            self.observe(self._on_prompt, names="prompt")

        def _on_layer(self, change) -> None:
            if change["new"] not in self._patterns.layers:
                self.layer = change["old"]
                return
            with self.hold_sync():
                for key, value in detail_state(self._patterns, self.layer, self.prompt).items():
                    setattr(self, key, value)

        def _on_prompt(self, change) -> None:
            if not 0 <= change["new"] < self._patterns.n_prompts:
                self.prompt = change["old"]
                return
            with self.hold_sync():
                state = {**prompt_state(self._patterns, self.prompt), **detail_state(self._patterns, self.layer, self.prompt)}
                for key, value in state.items():
                    setattr(self, key, value)

    return AttentionWidget


def __getattr__(name: str):
    """`AttentionWidget` is built on first use, so importing this module does not import anywidget."""
    if name == "AttentionWidget":
        return _widget_class()
    raise AttributeError(name)
