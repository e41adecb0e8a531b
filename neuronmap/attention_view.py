"""The attention viewer's data for the browser: 8-bit square-root-quantised patterns, deflated, a layer at a time.

Both views run the front end in `widgets/attention.js`. The live widget sends thumbnails of every head of every
layer at once and the selected layer's full patterns on demand; the static view embeds as many layers as fit
its size budget and truncates tokens (saying so) when even one layer does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
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
"""Most base64 characters of pattern data one static view embeds (the page stays under 2 MB)."""
STATIC_MAX_TOKENS = 512
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
    """One layer's `[head, query, key]` for one prompt, padding removed, cut to the first `n` tokens."""
    real = patterns.attention_mask[prompt].bool()
    block = patterns[layer][prompt][:, real][:, :, real]
    return block if n is None else block[:, :n, :n]


def thumbnails(patterns: AttentionPatterns, prompt: int, layers: Sequence[int], n: int | None = None) -> tuple[bytes, int]:
    """Max-pooled `[layer, head, T, T]` thumbnails (bytes) and T, so thin diagonals stay visible."""
    blocks = [layer_block(patterns, layer, prompt, n).float() for layer in layers]
    size = min(THUMB_SIZE, blocks[0].shape[-1])
    pooled = [F.adaptive_max_pool2d(block[None], size)[0] for block in blocks]
    return quantise(torch.stack(pooled)), size


def resolve_view(patterns: AttentionPatterns, layer: int, heads: Sequence[int], prompt: int) -> tuple[int, list[int], int]:
    """The layer number, sorted head numbers and prompt number a view asks for, negative ones counted from the end.

    Refuses a layer, head or prompt that the patterns do not have, naming what they do have.
    """
    bad = [head for head in heads if head not in range(-patterns.n_heads, patterns.n_heads)]
    if bad:
        raise InputError(f"heads {bad} out of range: there are {patterns.n_heads} heads")
    return patterns._layer(layer), sorted({patterns._head(head) for head in heads}), patterns._prompt(prompt)


def static_html(patterns: AttentionPatterns, prompt: int = 0, layer: int | None = None, heads: Sequence[int] = (0,)) -> str:
    """The self-contained static view of one prompt: as many layers as fit, from `layer` (the first) on."""
    layer, heads, prompt = resolve_view(patterns, patterns.layers[0] if layer is None else layer, heads, prompt)
    tokens = _prompt_tokens(patterns, prompt)
    total = len(tokens)
    n = min(total, STATIC_MAX_TOKENS)
    order = patterns.layers[patterns.layers.index(layer):] + patterns.layers[: patterns.layers.index(layer)]
    while True:
        details: dict[str, str] = {}
        size = 0
        for candidate in order:
            encoded = b64(pack(quantise(layer_block(patterns, candidate, prompt, n))))
            if details and size + len(encoded) > STATIC_BUDGET:
                break
            details[str(candidate)] = encoded
            size += len(encoded)
        if size <= STATIC_BUDGET or n <= 16:
            break
        n = max(16, int(n * 0.7))
    included = sorted(int(key) for key in details)
    thumbs, thumb_size = thumbnails(patterns, prompt, included, n)
    notes = [f"{patterns.model_name} · prompt {prompt + 1} of {patterns.n_prompts} · static view"]
    if n < total:
        notes.append(f"showing the first {n} of {total} tokens (size limit; the live widget shows all)")
    if len(included) < len(patterns.layers):
        notes.append(f"layers {included[0]}–{included[-1]} of {len(patterns.layers)} embedded (size limit)")
    data = {
        "layers": included,
        "n_heads": patterns.n_heads,
        "layer": layer,
        "heads": heads,
        "prompt": 0,
        "n_prompts": 1,
        "tokens": tokens[:n],
        "n_total": total,
        "thumb_size": thumb_size,
        "thumbs": b64(thumbs),
        "details": details,
        "note": " · ".join(notes),
    }
    return static_page("attention", data, _fallback(patterns, tokens, notes))


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
        n_prompts = traitlets.Int(1).tag(sync=True)
        tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
        n_total = traitlets.Int().tag(sync=True)
        thumb_size = traitlets.Int().tag(sync=True)
        thumbs = traitlets.Bytes().tag(sync=True)
        detail = traitlets.Bytes().tag(sync=True)
        detail_key = traitlets.Unicode().tag(sync=True)
        note = traitlets.Unicode().tag(sync=True)

        def __init__(self, patterns: AttentionPatterns, *, layer: int, heads: Sequence[int], prompt: int):
            layer, heads, prompt = resolve_view(patterns, layer, heads, prompt)
            self._patterns = patterns
            super().__init__(
                layers=patterns.layers,
                n_heads=patterns.n_heads,
                layer=layer,
                heads=heads,
                n_prompts=patterns.n_prompts,
                prompt=prompt,
                **self._prompt_state(prompt),
                **self._detail_state(layer, prompt),
            )
            self.observe(self._on_layer, names="layer")
            self.observe(self._on_prompt, names="prompt")

        def _prompt_state(self, prompt: int) -> dict:
            patterns = self._patterns
            tokens = _prompt_tokens(patterns, prompt)
            thumbs, size = thumbnails(patterns, prompt, patterns.layers)
            note = f"{patterns.model_name} · {len(patterns.layers)} layers × {patterns.n_heads} heads · {len(tokens)} tokens"
            return {"tokens": tokens, "n_total": len(tokens), "thumbs": thumbs, "thumb_size": size, "note": note}

        def _detail_state(self, layer: int, prompt: int) -> dict:
            block = layer_block(self._patterns, layer, prompt)
            return {"detail": pack(quantise(block)), "detail_key": f"{layer}:{prompt}"}

        def _on_layer(self, change) -> None:
            if change["new"] not in self._patterns.layers:
                self.layer = change["old"]
                return
            with self.hold_sync():
                for key, value in self._detail_state(self.layer, self.prompt).items():
                    setattr(self, key, value)

        def _on_prompt(self, change) -> None:
            if not 0 <= change["new"] < self._patterns.n_prompts:
                self.prompt = change["old"]
                return
            with self.hold_sync():
                for key, value in {**self._prompt_state(self.prompt), **self._detail_state(self.layer, self.prompt)}.items():
                    setattr(self, key, value)

    return AttentionWidget


_classes: dict[str, type] = {}


def __getattr__(name: str):
    """`AttentionWidget` is built on first use, so importing this module does not import anywidget."""
    if name == "AttentionWidget":
        if name not in _classes:
            _classes[name] = _widget_class()
        return _classes[name]
    raise AttributeError(name)
