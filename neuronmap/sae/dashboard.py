"""Feature dashboards: one latent's view (`FeatureDashboard`) and the browser over all of them (`FeatureBrowser`).

Both run the front end `widgets/sae.js`. What it draws comes in blobs: a JSON head (numbers, labels, token texts)
followed by binary arrays (the histogram, the context windows' token ids and activations as float16, the latents
most active on each of their tokens, the logit effects). A latent's blob is a few tens of kB however much data the
statistics covered. The live widget sends the list of latents once and a latent's blob when it is opened; the static
view embeds the list and, within `budget`, the blobs of the latents asked for (deflated, base64), with a note saying
how many of how many; where scripts do not run, a plain HTML summary (shaded contexts, an SVG histogram) shows.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import struct
from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..tokentext import token_text_html
from ..widget import b64, front_end, mimebundle, pack, static_page

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from .features import FeatureStatistics

STATIC_BUDGET = 1_500_000
"""Most base64 characters of dashboards a static browser embeds unless told otherwise (the page stays under 2 MB)."""
LIST_LIMIT = 4096
"""Latents a static browser lists at most (the first by its order, and every embedded one); the widget lists all."""
TOKEN_FEATURES = 5
"""Latents shown (and sent) for a clicked token."""
SEARCH_TOKENS = 5
"""Per latent, how many of its top contexts' tokens and of its most promoted tokens a search looks at."""
ORDERS = ("max", "density", "index")
_FALLBACK_CONTEXTS = 5
_FALLBACK_ROWS = 30
_FALLBACK_HINT = "To browse the features, run this cell, or trust the notebook (File \u2192 Trust Notebook)."
_DTYPES = {np.dtype("uint8"): "u8", np.dtype("<u2"): "u16", np.dtype("<i4"): "i32", np.dtype("<u4"): "u32",
           np.dtype("<f2"): "f16", np.dtype("<f4"): "f32"}


class FeatureDashboard(Renders):
    """One latent's dashboard: its top-activating contexts (each token shaded by the activation, the top one
    marked), samples from its activation intervals, its activation histogram and density, and its logit effects.
    Clicking a token lists the latents most active on it."""

    def __init__(self, statistics: FeatureStatistics, latent: int):
        self.statistics, self.latent = statistics, latent
        self.index = statistics.index(latent)

    @property
    def top_contexts(self):
        return self.statistics.top_contexts(self.latent)

    @property
    def intervals(self):
        return self.statistics.intervals(self.latent)

    @property
    def logit_effects(self):
        return self.statistics.logit_effects(self.latent)

    def __repr__(self) -> str:
        s, i = self.statistics, self.index
        return (f"FeatureDashboard(latent {self.latent} of {s.sae_name}: density {float(s.density[i]):.3%}, "
                f"max {float(s.max[i]):.4g})")

    def _repr_html_(self) -> str:
        data = {"mode": "dashboard", "title": _title(self.statistics), "open": self.latent, "list": None,
                "features": {str(self.latent): b64(pack(feature_blob(self.statistics, self.latent)))},
                "note": _about(self.statistics)}
        fallback = _fallback(self.statistics, [], self.latent, data["note"], "")
        return static_page("sae", data, fallback)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return mimebundle(self, self.widget)

    def widget(self):
        """The live view (an anywidget) of this latent; other latents open from it on demand."""
        return _widget_class()(self.statistics, mode="dashboard", latent=self.latent)

    def figure(self) -> go.Figure:
        """The latent's activation histogram as a plotly bar chart."""
        import plotly.graph_objects as go

        s, i = self.statistics, self.index
        edges = s.histogram_edges(self.latent).tolist()
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        figure = go.Figure(go.Bar(x=centres, y=s.histogram[i].tolist(), width=edges[1] - edges[0] if edges[1:] else 1))
        figure.update_layout(
            title=f"latent {self.latent}: activations where it fires ({int(s.count[i]):,} of {s.n_tokens:,} tokens)",
            xaxis_title="activation", yaxis_title="tokens", bargap=0.05, width=700, height=350,
        )
        return figure


class FeatureBrowser(Renders):
    """Every latent in a table sortable by density, max and mean activation, searchable for a token (latents whose
    top contexts peak on it or whose decoder promotes it), each opening its dashboard."""

    def __init__(self, statistics: FeatureStatistics, *, features: Sequence[int] | None = None, order: str = "max",
                 n: int = 32, budget: int | None = None):
        if order not in ORDERS:
            raise InputError(f"order must be one of {', '.join(map(repr, ORDERS))}, not {order!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n must be a positive int, got {n!r}")
        budget = STATIC_BUDGET if budget is None else budget
        if isinstance(budget, bool) or not isinstance(budget, Real) or not budget >= 1:
            raise InputError(f"budget must be a positive number of bytes, got {budget!r}")
        self.statistics, self.order, self.budget = statistics, order, budget
        ranked = ordered(statistics, order)
        if features is None:
            alive = [latent for latent in ranked if statistics.count[statistics.index(latent)] > 0]
            self.features, self.chosen = alive[:n], False
        else:
            if isinstance(features, (int, str)) or len(features) == 0:
                raise InputError(f"features must be a non-empty list of latents, got {features!r}")
            self.features = list(dict.fromkeys(int(f) for f in features))
            for latent in self.features:
                statistics.index(latent)
            self.chosen = True
        self.ranked = ranked

    def __repr__(self) -> str:
        s = self.statistics
        return f"FeatureBrowser({len(s.latents):,} latents of {s.sae_name}, by {self.order}, {len(self.features)} opened)"

    def _repr_html_(self) -> str:
        s = self.statistics
        blobs, used = {}, 0
        for latent in self.features:
            encoded = b64(pack(feature_blob(s, latent)))
            if blobs and used + len(encoded) > self.budget:
                break
            blobs[str(latent)] = encoded
            used += len(encoded)
        embedded = [int(key) for key in blobs]
        listed = list(dict.fromkeys(self.ranked[:LIST_LIMIT] + embedded))
        notes = [_about(s), self._embedded_note(embedded, used)]
        if len(listed) < len(s.latents):
            notes.append(f"listing {len(listed):,} of {len(s.latents):,} latents (the first by {self.order}; the live "
                         "widget lists all)")
        note = " · ".join(notes)
        data = {"mode": "browser", "title": _title(s), "open": embedded[0] if embedded else None,
                "list": b64(pack(list_blob(s, listed, self.order))), "features": blobs, "note": note}
        return static_page("sae", data, _fallback(s, listed, embedded[0] if embedded else None, note, self.order))

    def _embedded_note(self, embedded: list[int], used: int) -> str:
        s = self.statistics
        which = f"the {len(self.features)} chosen" if self.chosen else f"the first {len(self.features)} by {self.order}"
        if len(embedded) < len(self.features):
            whole = used / max(1, len(embedded)) * len(self.features) * 1.1
            which += (f" were asked for, {len(embedded)} fit the size limit: budget={_round_up(whole):_} embeds all "
                      f"{len(self.features)}")
        return (f"dashboards of {len(embedded)} of {len(s.latents):,} latents embedded ({which}; "
                "browser(features=[...]) chooses which, the live widget opens any)")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return mimebundle(self, self.widget)

    def widget(self):
        """The live browser (an anywidget): every latent listed, a latent's dashboard sent when it is opened."""
        return _widget_class()(self.statistics, mode="browser", latent=self.features[0] if self.features else None,
                               order=self.order)


def ordered(statistics: FeatureStatistics, order: str) -> list[int]:
    """The latents by `order`: highest max activation or density first (ties by index), or by index."""
    by_index = statistics.latents[torch.argsort(statistics.latents, stable=True)]
    if order == "index":
        return by_index.tolist()
    values = statistics.max.double() if order == "max" else statistics.density.double()
    values = values[torch.argsort(statistics.latents, stable=True)]
    return by_index[torch.argsort(-values, stable=True)].tolist()


def density_figure(statistics: FeatureStatistics) -> go.Figure:
    """A plotly histogram of the latents' log10 densities, with the dead latents counted in the title."""
    import plotly.graph_objects as go

    density = statistics.density
    alive = density[density > 0].log10().tolist()
    dead = int((density == 0).sum())
    figure = go.Figure(go.Histogram(x=alive, nbinsx=50))
    figure.update_layout(
        title=f"{statistics.sae_name}: feature density over {statistics.n_tokens:,} tokens ({dead:,} dead latents)",
        xaxis_title="log10 density (fraction of tokens where the latent fires)", yaxis_title="latents",
        width=700, height=350,
    )
    return figure


# --- blobs -----------------------------------------------------------------------------------------------------------


def blob(head: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A JSON head and binary arrays in one buffer: head length (uint32 LE), head (UTF-8), then each array at an
    8-byte boundary; the head's `arrays` maps each name to [offset from the first array, dtype, length]."""
    layout, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        data = array.tobytes()
        layout[name] = [offset, _DTYPES[array.dtype], int(array.size)]
        padding = -len(data) % 8
        chunks.append(data + b"\0" * padding)
        offset += len(data) + padding
    text = json.dumps({**head, "arrays": layout}, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-(4 + len(text)) % 8)
    return struct.pack("<I", len(text)) + text + b"".join(chunks)


def read_blob(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The head and arrays of a `blob` (what the front end decodes)."""
    size = struct.unpack_from("<I", data)[0]
    head = json.loads(data[4 : 4 + size].decode("utf-8"))
    start = 4 + size
    names = {code: dtype for dtype, code in _DTYPES.items()}
    arrays = {}
    for name, (offset, code, length) in head["arrays"].items():
        dtype = names[code]
        arrays[name] = np.frombuffer(data, dtype=dtype, count=length, offset=start + offset)
    return head, arrays


def feature_blob(statistics: FeatureStatistics, latent: int) -> bytes:
    """What the front end draws for one latent (see the module doc)."""
    s = statistics
    i = s.index(latent)
    groups, contexts = [], []
    top = s.top_contexts(latent)
    groups.append({"label": "top activations", "n": len(top)})
    contexts += top
    for interval in s.intervals(latent):
        groups.append({"label": "interval", "low": interval.low, "high": interval.high, "share": interval.share,
                       "n": len(interval.contexts)})
        contexts += interval.contexts
    ids = [token for context in contexts for token in context.ids]
    acts = [value for context in contexts for value in context.activations]
    rows = torch.cat([torch.arange(c.row - c.marked, c.row - c.marked + len(c.ids)) for c in contexts]) if contexts else (
        torch.zeros(0, dtype=torch.long))
    m = min(TOKEN_FEATURES, s.token_feature_ids.shape[1]) if s.token_feature_ids.numel() else 0
    feature_ids = s.token_feature_ids[rows][:, :m] if m and len(rows) else torch.zeros((len(rows), 0), dtype=torch.int32)
    feature_values = s.token_feature_values[rows][:, :m] if m and len(rows) else torch.zeros((len(rows), 0))
    wide = int(s.latents.max()) >= 0xFFFF
    arrays = {
        "hist": s.histogram[i].numpy().astype("<u4"),
        "ctx_ids": np.asarray(ids, dtype="<i4"),
        "ctx_acts": np.asarray(acts, dtype="<f2"),
        "tok_ids": feature_ids.numpy().astype("<i4") if wide else np.where(feature_ids.numpy() < 0, 0xFFFF,
                                                                            feature_ids.numpy()).astype("<u2"),
        "tok_vals": feature_values.numpy().astype("<f2"),
    }
    logits = s.logits
    if logits is not None:
        for side in ("top", "bottom"):
            arrays[f"{side}_ids"] = logits[f"{side}_ids"][i].numpy().astype("<i4")
            arrays[f"{side}_vals"] = logits[f"{side}_values"][i].numpy().astype("<f4")
            ids += logits[f"{side}_ids"][i].tolist()
    unique = sorted(set(ids))
    count = int(s.count[i])
    head = {
        "latent": int(latent), "count": count, "n_tokens": s.n_tokens, "max": float(s.max[i]),
        "mean": float(s.mean_active[i]) if count else None,
        "hist_top": float(s.histogram_edges(latent)[-1]), "groups": groups,
        "contexts": [{"sequence": c.sequence, "position": c.position, "value": c.value, "marked": c.marked,
                      "n": len(c.ids)} for c in contexts],
        "m": m, "none": -1 if wide else 0xFFFF, "logits": logits is not None,
        "texts": dict(zip(map(str, unique), s.texts(unique))),
    }
    return blob(head, arrays)


def list_blob(statistics: FeatureStatistics, latents: list[int], order: str) -> bytes:
    """The browser's table: each latent's density, max and mean when active, and the token ids a search looks at
    (the tokens its top contexts peak on, most often first, and its most promoted tokens)."""
    s = statistics
    index = torch.tensor([s.index(latent) for latent in latents], dtype=torch.long)
    rows = s.top_rows[index]
    peaks = torch.where(rows >= 0, s.tokens.long()[rows.clamp(min=0)], -1)
    logits = s.logits
    width = 2 * SEARCH_TOKENS
    search = np.full((len(latents), width), -1, dtype="<i4")
    for line, peak in enumerate(peaks.tolist()):
        common = [token for token, _ in collections.Counter(t for t in peak if t >= 0).most_common(SEARCH_TOKENS)]
        search[line, : len(common)] = common
    if logits is not None:
        n = min(SEARCH_TOKENS, logits["top_ids"].shape[1])
        search[:, SEARCH_TOKENS : SEARCH_TOKENS + n] = logits["top_ids"][index, :n].numpy()
    unique = sorted(set(search[search >= 0].tolist()))
    head = {"n": len(latents), "order": order, "search_width": width, "n_tokens": s.n_tokens,
            "texts": dict(zip(map(str, unique), s.texts(unique)))}
    mean = s.mean_active[index].float().numpy()
    arrays = {
        "latents": np.asarray(latents, dtype="<i4"),
        "density": s.density[index].float().numpy().astype("<f4"),
        "max": s.max[index].numpy().astype("<f4"),
        "mean": np.where(np.isnan(mean), -1.0, mean).astype("<f4"),
        "search": search,
    }
    return blob(head, arrays)


# --- the page without scripts ----------------------------------------------------------------------------------------


def _title(s: FeatureStatistics) -> str:
    return f"SAE features · {s.sae_name} · {s.hook_name} · {s.model_name}"


def _about(s: FeatureStatistics) -> str:
    dead = int((s.count == 0).sum())
    return (f"{len(s.latents):,} latents over {s.n_tokens:,} tokens in {s.n_sequences:,} sequences; "
            f"{dead:,} never fire")


def _fallback(s: FeatureStatistics, listed: list[int], latent: int | None, note: str, order: str) -> str:
    """What shows where scripts do not run: the table's first rows and one latent's contexts, histogram and logit
    effects, as plain HTML (escaped, inline styles)."""
    parts = [f"<div style='font-weight:600'>{escape(_title(s))}</div><div>{escape(note)}</div>"]
    if listed:
        rows = []
        for latent in listed[:_FALLBACK_ROWS]:
            i = s.index(latent)
            mean = s.mean_active[i]
            rows.append((latent, f"{float(s.density[i]):.3%}", f"{float(s.max[i]):.4g}",
                         "-" if math.isnan(mean) else f"{float(mean):.4g}"))
        parts.append(html_table(f"latents by {order} (the first {min(len(listed), _FALLBACK_ROWS)})",
                                ("latent", "density", "max", "mean when active"), rows, numeric=(0, 1, 2, 3)))
    if latent is not None:
        parts.append(_fallback_dashboard(s, latent))
    parts.append(f"<div>{escape(_FALLBACK_HINT)}</div>")
    return f'<div class="nm-fallback">{"".join(parts)}</div>'


def _fallback_dashboard(s: FeatureStatistics, latent: int) -> str:
    i = s.index(latent)
    head = (f"latent {latent}: fires on {float(s.density[i]):.3%} of tokens ({int(s.count[i]):,}), "
            f"max {float(s.max[i]):.4g}")
    lines = [f"<div style='font-weight:600;margin-top:6px'>{escape(head)}</div>", _histogram_svg(s, latent)]
    effects = s.logit_effects(latent)
    if effects is not None:
        for side, word in (("top", "promotes"), ("bottom", "suppresses")):
            listed = ", ".join(f"{text!r} {value:+.3g}" for text, value in effects[side][:8])
            lines.append(f"<div>{escape(word)}: {escape(listed)}</div>")
    scale = float(s.max[i])
    for context in s.top_contexts(latent, _FALLBACK_CONTEXTS):
        text = token_text_html(context.tokens, context.activations, scale=scale, marked=context.marked)
        lines.append(f"<div>{escape(format(context.value, '.3g'))} {text}</div>")
    return "".join(lines)


def _histogram_svg(s: FeatureStatistics, latent: int, width: int = 320, height: int = 70) -> str:
    """The latent's histogram as an inline SVG of bars, 0 to the top of its range under it."""
    i = s.index(latent)
    counts = s.histogram[i].tolist()
    top = max(counts) or 1
    step = width / len(counts)
    bars = "".join(
        f'<rect x="{k * step:.1f}" y="{height - c / top * height:.1f}" width="{max(step - 0.5, 0.5):.1f}" '
        f'height="{c / top * height:.1f}" fill="#e6550d"/>'
        for k, c in enumerate(counts) if c
    )
    end = float(s.histogram_edges(latent)[-1])
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 14}" role="img" '
        f'aria-label="activation histogram of latent {latent}">{bars}'
        f'<text x="0" y="{height + 12}" font-size="10">0</text>'
        f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">{escape(format(end, ".3g"))}</text></svg>'
    )


def _round_up(size: float) -> int:
    step = 10 ** max(0, math.floor(math.log10(max(size, 1))) - 1)
    return math.ceil(size / step) * step


# --- the live widget -------------------------------------------------------------------------------------------------


@functools.cache
def _widget_class():
    import anywidget
    import traitlets

    script, css = front_end("sae")

    class SAEWidget(anywidget.AnyWidget):
        """The live feature browser or dashboard: the list once, a latent's blob when it is opened."""

        _esm = script
        _css = css
        mode = traitlets.Unicode("browser").tag(sync=True)
        title = traitlets.Unicode().tag(sync=True)
        note = traitlets.Unicode().tag(sync=True)
        list_data = traitlets.Bytes().tag(sync=True)
        feature = traitlets.Int(-1).tag(sync=True)
        payload = traitlets.Bytes().tag(sync=True)
        payload_key = traitlets.Int(-1).tag(sync=True)
        error = traitlets.Unicode().tag(sync=True)

        def __init__(self, statistics: FeatureStatistics, *, mode: str, latent: int | None, order: str = "max"):
            self._statistics = statistics
            listed = ordered(statistics, order) if mode == "browser" else []
            super().__init__(
                mode=mode, title=_title(statistics), note=_about(statistics),
                list_data=pack(list_blob(statistics, listed, order)) if listed else b"",
            )
            self.observe(self._on_feature, names="feature")
            if latent is not None:
                self.feature = int(latent)

        def _on_feature(self, change) -> None:
            latent = change["new"]
            if latent < 0:
                return
            try:
                data = pack(feature_blob(self._statistics, latent))
            except Exception as error:  # shown in the view: a kernel-side traceback would be invisible there
                self.error = f"latent {latent}: {error}"
                return
            with self.hold_sync():
                self.error = ""
                self.payload = data
                self.payload_key = latent

    return SAEWidget


def __getattr__(name: str):
    """`SAEWidget` is built on first use, so importing this module does not import anywidget."""
    if name == "SAEWidget":
        return _widget_class()
    raise AttributeError(name)
