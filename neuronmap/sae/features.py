"""What every latent of a sparse autoencoder does over a dataset, gathered in one streaming pass.

`feature_statistics(sae, model, inputs)` runs the model to the SAE's hook (stopping there) batch by batch, or reads
the hook's rows from an activation store, encodes them, and keeps for every latent at once: its firing count
(density), max, and sum (mean when active); an activation histogram; its `top_k` largest activations with the
activations around each (a context window); a few uniform samples from each of its activation intervals; and, for
every token, the latents most active on it. The token ids of the whole stream are kept, so contexts render after
the pass without the model. Logit effects (the decoder direction through the unembedding) come from the weights.

Only what is active costs: each batch's non-zero activations are found once (`nonzero`) and everything is
accumulated from them with `bincount`/`index_add_`. Each latent's running top-k is merged with `torch.topk`, but only
for the activations above its current k-th best and above the lowest histogram bin its top k can reach (after the
first batches, few); a merge writes only the entrants, into the slots of those they push out, so the context windows
kept with them never move and are gathered for entrants only. Interval samples are kept the same way: each
activation gets a uniform random key and each interval keeps the items with the largest keys, a uniform sample
without replacement (merging two such samples gives one of their union).

Histograms use linear bins from 0 to a power of two, 2^e, the smallest above the latent's max so far: bin i holds
activations in [i, i + 1) · 2^e / bins. When a larger activation comes, e grows and neighbouring bins are added
together, which is exact because the bin edges of the wider range are edges of the narrower one (and every step is
a multiplication by a power of two, exact in floating point). So one pass gives per-latent linear bins that always
use at least half their range, without knowing the max in advance. The sample intervals are groups of those bins
(`bands` equal-width intervals of [0, 2^e)), as sae-dashboard's and Neuronpedia's equal-width "quantile" intervals
of [0, max], and for the same reason: interval edges that are unknown until the pass ends cannot be sampled in it.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..display import Renders
from ..errors import InputError, SAEError

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from ..model import Model
    from ..store.reader import ActivationStore
    from .autoencoder import SAE
    from .dashboard import FeatureBrowser, FeatureDashboard

_NO_EXPONENT = -200
"""A histogram exponent for a latent that has not fired yet (any real one replaces it)."""
_STORE_ROWS = 8192
"""Rows of an activation store encoded at a time."""
_LOGIT_CHUNK = 256
"""Latents whose logits over the whole vocabulary are computed at a time (bounds that product's memory)."""


def feature_statistics(
    sae: SAE,
    source: Model | ActivationStore | str | os.PathLike,
    inputs: Any = None,
    *,
    hook_name: str | None = None,
    features: Sequence[int] | None = None,
    top_k: int = 20,
    context: int | tuple[int, int] = (10, 4),
    bins: int = 64,
    bands: int = 8,
    band_samples: int = 5,
    token_features: int = 5,
    logit_tokens: int = 10,
    model: Model | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> FeatureStatistics:
    """Statistics of the SAE's latents over a dataset, in one pass: `FeatureStatistics` (see the module doc).

    `source`: a `Model` with `inputs` (a list of strings, any iterable of strings, or token ids `[sequences, pos]`),
    run `batch_size` sequences at a time up to `hook_name` (default: the SAE's own); or an activation store (or
    its path) that holds that hook, with the model optional (`model=` adds logit effects). Padding never counts.
    `features`: latent indices to keep statistics for (default all). `top_k`: the largest activations kept per
    latent; `context`: tokens shown either side of one (an int, or `(before, after)`). `bins`: histogram bins and
    `bands`: sample intervals per latent (powers of two, `bands <= bins`), `band_samples` samples each.
    `token_features`: the most active latents kept for every token (what clicking a token lists; 0 keeps none).
    `logit_tokens`: the most promoted and most suppressed tokens kept per latent. `seed` fixes the samples.
    """
    settings = _Settings.checked(top_k, context, bins, bands, band_samples, token_features, logit_tokens, batch_size)
    from .autoencoder import SAE

    if not isinstance(sae, SAE):
        raise SAEError(f"feature_statistics needs a neuronmap SAE, not a {type(sae).__name__}")
    hook = hook_name or sae.cfg.hook_name
    if hook is None:
        raise SAEError("this SAE names no hook: pass hook_name= (the hook point its inputs come from)")
    latents = _latents(features, sae.cfg.d_sae)
    stream = _stream(source, inputs, hook, settings, model)
    try:
        accumulator = None
        for batch in stream.batches(progress):
            with torch.no_grad():
                acts = sae.encode(batch.activations.to(device=sae.W_enc.device))
            acts = acts.float() if latents is None else acts[:, latents.to(acts.device)].float()
            batch.sequences = batch.sequences.to(acts.device)
            if accumulator is None:
                accumulator = _Accumulator(acts.shape[1], settings, acts.device, seed)
            accumulator.add(acts, batch)
    finally:
        stream.close()
    if accumulator is None or accumulator.n_tokens == 0:
        raise InputError("the inputs hold no tokens to gather statistics over")
    ids = latents if latents is not None else torch.arange(sae.cfg.d_sae)
    directions = sae.W_dec.detach()[ids.to(sae.W_dec.device)].clone()
    logits = _LogitEffects(stream.model, hook, directions, settings.logit_tokens)
    return accumulator.result(ids, stream, hook, repr(sae), logits)


@dataclass(frozen=True)
class _Settings:
    top_k: int
    before: int
    after: int
    bins: int
    bands: int
    band_samples: int
    token_features: int
    logit_tokens: int
    batch_size: int

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    @classmethod
    def checked(cls, top_k, context, bins, bands, band_samples, token_features, logit_tokens, batch_size) -> _Settings:
        before, after = (context, context) if isinstance(context, int) and not isinstance(context, bool) else (
            tuple(context) if isinstance(context, (tuple, list)) and len(context) == 2 else (None, None))
        counts = {"top_k": top_k, "band_samples": band_samples, "batch_size": batch_size}
        sizes = {"token_features": token_features, "logit_tokens": logit_tokens, "context before": before,
                 "context after": after}
        for name, value in {**counts, **sizes}.items():
            low = 1 if name in counts else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name} must be an int >= {low}, got {value!r}")
        for name, value in (("bins", bins), ("bands", bands)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1) or value > 4096:
                raise InputError(f"{name} must be a power of two from 1 to 4096, got {value!r}")
        if bands > bins:
            raise InputError(f"bands ({bands}) cannot exceed bins ({bins}): each interval is a group of bins")
        return cls(top_k, before, after, bins, bands, band_samples, token_features, logit_tokens, batch_size)


def _latents(features: Sequence[int] | None, d_sae: int) -> torch.Tensor | None:
    if features is None:
        return None
    ids = torch.as_tensor(list(features) if not isinstance(features, torch.Tensor) else features)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise InputError(f"features must be a non-empty list of latent indices, got {features!r}")
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if bad.numel():
        raise SAEError(f"latent {int(bad[0])} is out of range: this SAE has d_sae={d_sae} latents (0 to {d_sae - 1})")
    if ids.unique().numel() != ids.numel():
        raise InputError("features lists a latent more than once")
    return ids.long()


# --- where activations come from ------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Activations `[rows, d_in]` of consecutive rows of the stream, of which `owned` are this batch's to count (the
    rest a margin that only context windows read), the owned rows' token ids, and each row's sequence number."""

    activations: torch.Tensor
    owned: slice
    tokens: torch.Tensor
    sequences: torch.Tensor
    first_row: int


class _ModelStream:
    """Batches of sequences run through the model up to the hook (no margin: a sequence is never split)."""

    def __init__(self, model: Model, inputs: Any, hook: str, settings: _Settings):
        if inputs is None:
            raise InputError("feature_statistics from a model needs inputs (strings or token ids)")
        model.resolve(hook)  # an unknown hook fails here, before anything runs
        self.model, self.hook, self.settings = model, hook, settings
        self.inputs = inputs
        self.starts: list[int] = [0]
        self.contiguous = True
        self.name = model.name

    def batches(self, progress: bool) -> Iterator[_Batch]:
        from tqdm.auto import tqdm

        chunks, total = _chunks(self.inputs, self.settings.batch_size)
        row = 0
        for chunk in tqdm(chunks, total=total, desc="feature statistics", unit="batch", disable=not progress):
            trace = self.model.run(chunk, capture=self.hook, stop_early=True)
            mask = trace.attention_mask.bool() if trace.attention_mask is not None else None
            acts = trace[self.hook]
            if mask is None:
                mask = torch.ones(acts.shape[:2], dtype=torch.bool)
            mask = mask.to(acts.device)
            lengths = mask.sum(1).cpu()
            first = len(self.starts) - 1
            self.starts.extend((row + lengths.cumsum(0)).tolist())
            sequences = torch.repeat_interleave(torch.arange(first, first + len(lengths)), lengths)
            if bool(mask.all()):  # no padding: every position is a token, no copy needed
                tokens, activations = trace.tokens.reshape(-1).cpu(), acts.flatten(0, 1)
            else:
                tokens, activations = trace.tokens.to(mask.device)[mask].cpu(), acts[mask]
            yield _Batch(activations, slice(0, len(tokens)), tokens, sequences, row)
            row += len(tokens)

    def texts(self, ids: list[int]) -> list[str]:
        from ..inputs import token_strings

        return token_strings(self.model.tokenizer, ids)

    def close(self) -> None:
        pass


class _StoreStream:
    """Consecutive rows of an activation store, read a block at a time with a margin for the context windows.

    A store that keeps every position has each document's tokens on consecutive rows; one that keeps only some
    (`positions=` at extraction) has no neighbours to show, so its contexts are the token alone.
    """

    def __init__(self, store: ActivationStore, hook: str, settings: _Settings, model: Model | None, own: bool):
        self.store, self.own = store, own
        self.view = store[hook]  # an unknown hook raises HookNameError
        self.model, self.settings = model, settings
        documents = store.documents
        self.starts = documents.tolist()
        self.contiguous = store.metadata.get("positions") in (None, "all")
        self.name = store.model_name
        self._documents = documents
        self._vocabulary = store.vocabulary  # read now: the store may be closed before the views need it

    def batches(self, progress: bool) -> Iterator[_Batch]:
        from tqdm.auto import tqdm

        n = len(self.store)
        before, after = (self.settings.before, self.settings.after) if self.contiguous else (0, 0)
        tokens = self.store.tokens
        for start in tqdm(range(0, n, _STORE_ROWS), desc="feature statistics", unit="block", disable=not progress):
            stop = min(n, start + _STORE_ROWS)
            low, high = max(0, start - before), min(n, stop + after)
            activations = self.view.to_torch(self.view.read(low, high))
            rows = torch.arange(low, high)
            if self.contiguous:
                sequences = torch.searchsorted(self._documents, rows, right=True) - 1
            else:
                sequences = rows  # every row its own: no neighbours
            owned = slice(start - low, stop - low)
            yield _Batch(activations, owned, tokens[start:stop], sequences, start)

    def texts(self, ids: list[int]) -> list[str]:
        return [self._vocabulary[i] for i in ids]

    def close(self) -> None:
        if self.own:
            self.store.close()


def _stream(source: Any, inputs: Any, hook: str, settings: _Settings, model: Model | None):
    from ..model import Model

    if isinstance(source, Model):
        if model is not None and model is not source:
            raise InputError("model= is for statistics from a store; here the source is already a model")
        return _ModelStream(source, inputs, hook, settings)
    from ..store.reader import ActivationStore

    if isinstance(source, (str, os.PathLike)):
        store, own = ActivationStore(source), True
    elif isinstance(source, ActivationStore):
        store, own = source, False
    else:
        raise InputError(
            f"feature_statistics reads a Model (with inputs) or an activation store (or its path), not a "
            f"{type(source).__name__}"
        )
    if inputs is not None:
        raise InputError("inputs are for statistics from a model; a store already holds its tokens")
    if model is not None and not isinstance(model, Model):
        raise InputError(f"model= must be a neuronmap Model, not a {type(model).__name__}")
    try:
        return _StoreStream(store, hook, settings, model, own)
    except BaseException:
        if own:
            store.close()
        raise


def _chunks(inputs: Any, size: int) -> tuple[Iterable[Any], int | None]:
    """`inputs` cut into runs of `size` sequences, and how many runs (None when unknown)."""
    if isinstance(inputs, torch.Tensor):
        rows = inputs if inputs.dim() == 2 else inputs.reshape(1, -1)
        return rows.split(size), math.ceil(len(rows) / size)
    if isinstance(inputs, str):
        return [[inputs]], 1
    if not isinstance(inputs, Iterable):
        raise InputError(f"inputs must be strings or token ids, not a {type(inputs).__name__}")
    total = math.ceil(len(inputs) / size) if hasattr(inputs, "__len__") else None

    def runs() -> Iterator[list[Any]]:
        run: list[Any] = []
        for item in inputs:
            run.append(item)
            if len(run) == size:
                yield run
                run = []
        if run:
            yield run

    return runs(), total


# --- the result ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """A token of the data and its neighbours, with one latent's activation on each (the `marked` one is the token).

    `row` is the token's place in the stream of all tokens; `sequence` and `position` where it is in the inputs
    (the sequence's index, the token's index among its real tokens; for a store, the document and position).
    """

    row: int
    sequence: int
    position: int
    value: float
    ids: list[int]
    tokens: list[str]
    activations: list[float]
    marked: int


@dataclass(frozen=True)
class Interval:
    """Uniform samples from the activations of one latent that fall in [low, high), and their share of all its
    activations."""

    low: float
    high: float
    share: float
    contexts: list[Context]


class FeatureStatistics(Renders):
    """What `feature_statistics` gathered: per-latent tensors indexed like `latents` (the latent indices kept).

    `count` (firings), `density` (firings per token), `max`, `mean_active`; `histogram [latent, bins]` with
    `histogram_edges(latent)`; `top_values`/`top_rows [latent, top_k]` (rows of the token stream, -1 where a latent
    fired fewer times); the same for interval samples (`band_values`/`band_rows [latent, bands, samples]`); the
    stream's `tokens` and sequence `starts`; `token_feature_ids`/`token_feature_values [token, m]` (each token's most
    active latents); `logits` (the top and bottom logit effects, or None). `top_contexts(latent)`,
    `intervals(latent)`, `logit_effects(latent)` and `features_on(row)` read them; `dashboard(latent)` shows one
    latent and `browser()` all of them. It renders as the browser.
    """

    def __init__(self, *, latents, sae_name, hook_name, model_name, n_tokens, count, max, sum, exponent, histogram,
                 top_values, top_rows, top_windows, band_values, band_rows, band_windows, tokens, starts, contiguous,
                 token_feature_ids, token_feature_values, logits, context, texts):
        self.latents = latents
        self.sae_name, self.hook_name, self.model_name = sae_name, hook_name, model_name
        self.n_tokens = n_tokens
        self.count, self.max, self.sum, self.exponent, self.histogram = count, max, sum, exponent, histogram
        self.top_values, self.top_rows, self.top_windows = top_values, top_rows, top_windows
        self.band_values, self.band_rows, self.band_windows = band_values, band_rows, band_windows
        self.tokens, self.starts, self.contiguous = tokens, starts, contiguous
        self.token_feature_ids, self.token_feature_values = token_feature_ids, token_feature_values
        self._logits = logits
        self.context = context
        self._texts = texts
        self._text_cache: dict[int, str] = {}
        self._index = {int(latent): i for i, latent in enumerate(latents.tolist())}
        self._starts = starts.tolist()

    @property
    def logits(self) -> dict[str, torch.Tensor] | None:
        """The logit effects: `top_ids`, `top_values`, `bottom_ids`, `bottom_values [latent, logit_tokens]` (computed
        from the weights on first use), or None without a model's unembedding."""
        return self._logits.get()

    # --- per-latent numbers ---

    @property
    def density(self) -> torch.Tensor:
        """Fraction of tokens on which each latent fires (is above 0)."""
        return self.count.double() / self.n_tokens

    @property
    def mean_active(self) -> torch.Tensor:
        """Each latent's mean activation over the tokens where it fires (NaN for a latent that never does)."""
        return torch.where(self.count > 0, self.sum / self.count.clamp(min=1), math.nan)

    @property
    def dead(self) -> torch.Tensor:
        """The latents that never fired on these tokens."""
        return self.latents[self.count == 0]

    @property
    def n_sequences(self) -> int:
        return len(self.starts) - 1

    def index(self, latent: int) -> int:
        """Where latent `latent` sits in this object's per-latent tensors."""
        if isinstance(latent, bool) or not isinstance(latent, (int, torch.Tensor)) or (
            isinstance(latent, torch.Tensor) and latent.numel() != 1):
            raise InputError(f"a latent is an int index, not {latent!r}")
        latent = int(latent)
        if latent not in self._index:
            if self.latents.numel() and len(self._index) == int(self.latents.max()) + 1:
                raise SAEError(f"latent {latent} is out of range: these statistics cover latents 0 to {len(self._index) - 1}")
            raise SAEError(f"latent {latent} is not among the {len(self._index)} latents these statistics were gathered for")
        return self._index[latent]

    def histogram_edges(self, latent: int) -> torch.Tensor:
        """The `bins + 1` edges of `histogram[index(latent)]`: 0 to 2^e, the smallest power of two above its max."""
        i = self.index(latent)
        bins = self.histogram.shape[1]
        top = 0.0 if self.count[i] == 0 else math.ldexp(1.0, int(self.exponent[i]))
        return torch.arange(bins + 1, dtype=torch.float64) * (top / bins)

    # --- what the views show ---

    def top_contexts(self, latent: int, n: int | None = None) -> list[Context]:
        """The contexts of the latent's largest activations, largest first (at most `n`)."""
        i = self.index(latent)
        rows = self.top_rows[i]
        kept = [k for k in range(len(rows)) if rows[k] >= 0][:n]
        return [self._context(int(rows[k]), float(self.top_values[i, k]), self.top_windows[i, k]) for k in kept]

    def intervals(self, latent: int) -> list[Interval]:
        """The latent's activation intervals that hold activations, highest first, each with its samples (by value)."""
        i = self.index(latent)
        edges = self.histogram_edges(latent)
        bands = self.band_rows.shape[1]
        per_band = self.histogram.shape[1] // bands
        counts = self.histogram[i].view(bands, per_band).sum(1)
        found = []
        for band in reversed(range(bands)):
            if counts[band] == 0:
                continue
            rows = self.band_rows[i, band]
            contexts = [
                self._context(int(rows[k]), float(self.band_values[i, band, k]), self.band_windows[i, band, k])
                for k in range(len(rows)) if rows[k] >= 0
            ]
            low, high = float(edges[band * per_band]), float(edges[(band + 1) * per_band])
            found.append(Interval(low, high, float(counts[band]) / max(1, int(self.count[i])), contexts))
        return found

    def logit_effects(self, latent: int) -> dict[str, list[tuple[str, float]]] | None:
        """The tokens the latent's decoder direction most promotes (`"top"`) and suppresses (`"bottom"`), with
        their logit effect; None without a model's unembedding."""
        if self.logits is None:
            return None
        i = self.index(latent)
        effects = {}
        for side in ("top", "bottom"):
            ids = self.logits[f"{side}_ids"][i].tolist()
            effects[side] = list(zip(self.texts(ids), self.logits[f"{side}_values"][i].tolist()))
        return effects

    def features_on(self, row: int) -> list[tuple[int, float]]:
        """The latents most active on the token at `row` of the stream, with their activations, most active first."""
        if not 0 <= row < len(self.tokens):
            raise InputError(f"row {row} is out of range: the statistics cover {len(self.tokens):,} tokens")
        if self.token_feature_ids.numel() == 0:
            return []
        ids, values = self.token_feature_ids[row].tolist(), self.token_feature_values[row].tolist()
        return [(i, v) for i, v in zip(ids, values) if i >= 0]

    def location(self, row: int) -> tuple[int, int]:
        """(sequence, position) of the token at `row` of the stream (position -1 for a store that kept only some)."""
        sequence = bisect.bisect_right(self._starts, row) - 1
        return sequence, row - self._starts[sequence] if self.contiguous else -1

    def texts(self, ids: Sequence[int]) -> list[str]:
        """The text of each token id (decoded once, then remembered)."""
        cache = self._text_cache
        missing = sorted({int(i) for i in ids if int(i) not in cache})
        if missing:
            self._text_cache.update(zip(missing, self._texts(missing)))
        return [self._text_cache[int(i)] for i in ids]

    def _context(self, row: int, value: float, window: torch.Tensor) -> Context:
        values = window.tolist()
        inside = [k for k, x in enumerate(values) if x == x]  # not NaN: a run, the window within the sequence
        first = row - self.context[0] + inside[0]
        ids = self.tokens[first : first + len(inside)].tolist()
        sequence, position = self.location(row)
        return Context(row, sequence, position, value, ids, self.texts(ids), values[inside[0] : inside[-1] + 1],
                       self.context[0] - inside[0])

    # --- views ---

    def dashboard(self, latent: int) -> FeatureDashboard:
        """One latent's dashboard: contexts, interval samples, histogram, density, logit effects."""
        from .dashboard import FeatureDashboard

        self.index(latent)
        return FeatureDashboard(self, int(latent))

    def browser(self, features: Sequence[int] | None = None, *, order: str = "max", n: int = 32,
                budget: int | None = None) -> FeatureBrowser:
        """Every latent in a table sortable by density and max activation, searchable by token, each opening its
        dashboard. The static view embeds the dashboards of `features` (default: the first `n` by `order`,
        `"max"`, `"density"` or `"index"`) within `budget` bytes; the live widget fetches any latent's on demand."""
        from .dashboard import FeatureBrowser

        return FeatureBrowser(self, features=features, order=order, n=n, budget=budget)

    def figure(self) -> go.Figure:
        """A plotly histogram of the latents' log10 densities (dead latents counted apart)."""
        from .dashboard import density_figure

        return density_figure(self)

    def __repr__(self) -> str:
        dead = int((self.count == 0).sum())
        return (
            f"FeatureStatistics({len(self.latents):,} latents of {self.sae_name} over {self.n_tokens:,} tokens in "
            f"{self.n_sequences:,} sequences, {dead:,} dead)"
        )

    def _repr_html_(self) -> str:
        return self.browser()._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return {**self.browser()._repr_mimebundle_(include, exclude), "text/plain": repr(self)}


# --- the pass --------------------------------------------------------------------------------------------------------


class _Best:
    """For each of `groups` groups, the `k` highest-scoring items seen, in no order, with their payloads; `empty`
    marks a free slot (it loses to every real score). A merge writes only the items that get in, each into the slot
    of one it pushes out, so what is kept (context windows) never moves."""

    def __init__(self, groups: int, k: int, empty: float, payloads: dict[str, tuple], device: torch.device):
        self.k, self.empty = k, empty
        self.scores = torch.full((groups, k), empty, device=device)
        self.fills = {name: fill for name, (_, fill, _) in payloads.items()}
        self.payloads = {
            name: torch.full((groups, k, *shape), fill, dtype=dtype, device=device)
            for name, (dtype, fill, shape) in payloads.items()
        }

    def threshold(self) -> torch.Tensor:
        """Each group's k-th best score: only a higher one gets in."""
        return self.scores.amin(1)

    def admit(self, group: torch.Tensor, score: torch.Tensor, **payloads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Merge candidates into their groups with `topk` over each group's k kept and its candidates (padded), and
        write the candidates that get in into the slots of the items they push out.

        Returns where they went, `(group, slot)`, and which candidates they are, for the caller to fill in payloads
        it did not give (payloads given are written here).
        """
        order = torch.argsort(group, stable=True)
        hit, line, counts = torch.unique_consecutive(group[order], return_inverse=True, return_counts=True)
        starts = counts.cumsum(0) - counts
        slot = torch.arange(len(order), device=group.device) - starts[line]
        width = int(counts.max())
        padded = torch.full((len(hit), width), -math.inf, device=score.device)  # below `empty`: never chosen
        padded[line, slot] = score[order]
        pick = torch.cat([self.scores[hit], padded], 1).topk(self.k, dim=1).indices
        chosen = torch.zeros((len(hit), self.k + width), dtype=torch.bool, device=group.device).scatter_(1, pick, True)
        # both lists run row by row, and each row frees as many kept slots as it lets candidates in
        line_out, slot_out = (~chosen[:, : self.k]).nonzero().unbind(1)
        line_in, slot_in = chosen[:, self.k :].nonzero().unbind(1)
        which = order[starts[line_in] + slot_in]
        groups = hit[line_out]
        self.scores[groups, slot_out] = score[which]
        for name, values in payloads.items():
            self.payloads[name][groups, slot_out] = values[which]
        return groups, slot_out, which

    def take(self, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """The kept items of `groups` (flattened, free slots left out), and those groups emptied."""
        scores = self.scores[groups].flatten()
        filled = scores != self.empty
        taken = {"score": scores[filled], "group": groups.repeat_interleave(self.k)[filled]}
        for name, kept in self.payloads.items():
            taken[name] = kept[groups].flatten(0, 1)[filled]
            kept[groups] = self.fills[name]
        self.scores[groups] = self.empty
        return taken


class _Accumulator:
    """Everything the pass keeps, updated batch by batch from the batch's non-zero activations."""

    def __init__(self, n: int, settings: _Settings, device: torch.device, seed: int):
        s = settings
        self.settings, self.n, self.device = s, n, device
        self.n_tokens = 0
        self.count = torch.zeros(n, dtype=torch.long, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, device=device)
        self.exponent = torch.full((n,), _NO_EXPONENT, dtype=torch.long, device=device)
        self.histogram = torch.zeros((n, s.bins), dtype=torch.long, device=device)
        self.log_bins = s.bins.bit_length() - 1
        self.band_shift = self.log_bins - (s.bands.bit_length() - 1)
        window = (torch.float32, math.nan, (s.window,))
        self.top = _Best(n, s.top_k, 0.0, {"row": (torch.long, -1, ()), "window": window}, device)
        self.samples = _Best(n * s.bands, s.band_samples, -1.0,
                             {"value": (torch.float32, 0.0, ()), "row": (torch.long, -1, ()), "window": window}, device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.offsets = torch.arange(-s.before, s.after + 1, device=device)
        self.tokens: list[torch.Tensor] = []
        self.token_ids: list[torch.Tensor] = []
        self.token_values: list[torch.Tensor] = []

    def add(self, acts: torch.Tensor, batch: _Batch) -> None:
        own = acts[batch.owned]
        rows = own.shape[0]
        self.tokens.append(batch.tokens.to(torch.int32))
        if rows == 0:
            return
        n = self.n
        flat = (own.view(-1) > 0).nonzero().squeeze(1)  # grouped by token, latents in order within each
        v = own.view(-1).index_select(0, flat)
        t = flat // n
        f = flat - t * n
        self._grow(own.amax(0))
        self.count += torch.bincount(f, minlength=n)
        self.sum += own.sum(0)  # float32 within a batch, float64 across batches
        bins = (v * self._scale().index_select(0, f)).long()
        self.histogram.view(-1).index_add_(0, f * self.settings.bins + bins, torch.ones_like(bins))

        first = batch.first_row
        high = (v > self._top_bound().index_select(0, f)).nonzero().squeeze(1)
        if high.numel():
            th, fh = t[high], f[high]
            groups, slots, which = self.top.admit(fh, v[high], row=first + th)
            self._put_windows(self.top, groups, slots, th[which], fh[which], acts, batch)
        group = f * self.settings.bands + (bins >> self.band_shift)
        keys = torch.rand(v.shape, generator=self.generator, device=v.device)
        lucky = (keys > self.samples.threshold().index_select(0, group)).nonzero().squeeze(1)
        if lucky.numel():
            tl, fl = t[lucky], f[lucky]
            groups, slots, which = self.samples.admit(group[lucky], keys[lucky], value=v[lucky], row=first + tl)
            self._put_windows(self.samples, groups, slots, tl[which], fl[which], acts, batch)
        if self.settings.token_features:
            ids, values = _per_token_best(t, f, v, rows, self.settings.token_features)
            self.token_ids.append(ids.cpu())
            self.token_values.append(values.cpu())
        self.n_tokens += rows

    def _grow(self, batch_max: torch.Tensor) -> None:
        """Widen each histogram whose range the batch's max exceeds (adding neighbouring bins together), and sort
        its samples into the wider intervals (each interval keeps the largest keys of the ones it joins)."""
        self.max = torch.maximum(self.max, batch_max)
        exponent = torch.frexp(batch_max)[1].long()
        wanted = torch.where(batch_max > 0, torch.maximum(self.exponent, exponent), self.exponent)
        grown = ((wanted > self.exponent) & (self.count > 0)).nonzero().squeeze(1)
        self.exponent, before = wanted, self.exponent
        if grown.numel() == 0:
            return
        shift = (wanted[grown] - before[grown]).clamp(max=self.log_bins)
        target = torch.arange(self.settings.bins, device=self.device)[None] >> shift[:, None]
        self.histogram[grown] = torch.zeros_like(self.histogram[grown]).scatter_add_(1, target, self.histogram[grown])
        bands = self.settings.bands
        kept = self.samples.take((grown[:, None] * bands + torch.arange(bands, device=self.device)).flatten())
        feature = kept.pop("group") // bands
        bins = (kept["value"] * self._scale()[feature]).long()
        self.samples.admit(feature * bands + (bins >> self.band_shift), kept.pop("score"), **kept)

    def _top_bound(self) -> torch.Tensor:
        """What an activation must exceed to be among its latent's top k: the k-th best kept, and (from the histogram,
        which already counts this batch) just below the lower edge of the highest bin that k activations reach."""
        k = self.settings.top_k
        from_top = self.histogram.flip(1).cumsum(1)
        reached = (from_top < k).sum(1)  # bins above the one where the count from the top reaches k
        edge = (self.settings.bins - 1 - reached).clamp(min=0) / self._scale()
        edge = torch.where(reached < self.settings.bins, edge, 0.0)
        return torch.maximum(self.top.threshold(), torch.nextafter(edge, torch.full_like(edge, -1.0)))

    def _scale(self) -> torch.Tensor:
        """What turns an activation into its bin: bins / 2^exponent, per latent (exact: a power of two)."""
        return torch.ldexp(torch.ones_like(self.max), self.log_bins - self.exponent)

    def _put_windows(self, best: _Best, groups: torch.Tensor, slots: torch.Tensor, t: torch.Tensor, f: torch.Tensor,
                     acts: torch.Tensor, batch: _Batch) -> None:
        """Record the context windows of the items that got in (latent `f` around owned row `t`)."""
        windows = best.payloads["window"]
        windows.view(-1, windows.shape[-1])[groups * best.k + slots] = self._windows(acts, batch, t, f)

    def _windows(self, acts: torch.Tensor, batch: _Batch, t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Latent `f`'s activations on the context window around owned row `t`: NaN outside its sequence."""
        center = t + batch.owned.start
        at = center[:, None] + self.offsets
        inside = (at >= 0) & (at < acts.shape[0])
        at = at.clamp(0, acts.shape[0] - 1)
        inside &= batch.sequences[at] == batch.sequences[center][:, None]
        values = acts.view(-1)[(at * acts.shape[1] + f[:, None]).view(-1)].view(at.shape)
        return values.masked_fill(~inside, math.nan)

    def result(self, latents: torch.Tensor, stream: Any, hook: str, sae_name: str, logits: _LogitEffects) -> FeatureStatistics:
        s = self.settings
        top_values, order = self.top.scores.cpu().sort(1, descending=True)
        top_rows = self.top.payloads["row"].cpu().gather(1, order)
        top_rows[top_values <= 0] = -1
        top_windows = self.top.payloads["window"].cpu().gather(1, order[..., None].expand(-1, -1, s.window))
        samples = self.samples
        filled = (samples.scores >= 0).cpu()
        value = samples.payloads["value"].cpu().masked_fill(~filled, 0.0)
        # each interval's samples by activation, highest first (their random keys have done their work)
        value, order = value.view(self.n, s.bands, s.band_samples).sort(-1, descending=True)
        rows = samples.payloads["row"].cpu().masked_fill(~filled, -1).view(self.n, s.bands, s.band_samples)
        windows = samples.payloads["window"].cpu().view(self.n, s.bands, s.band_samples, s.window)
        token_ids = torch.cat(self.token_ids) if self.token_ids else torch.empty(0, 0, dtype=torch.int32)
        token_values = torch.cat(self.token_values) if self.token_values else torch.empty(0, 0)
        if len(token_ids):
            token_ids = torch.where(token_ids >= 0, latents.to(torch.int32)[token_ids.clamp(min=0).long()], token_ids)
        return FeatureStatistics(
            latents=latents,
            sae_name=sae_name,
            hook_name=hook,
            model_name=stream.name,
            n_tokens=self.n_tokens,
            count=self.count.cpu(),
            max=self.max.cpu(),
            sum=self.sum.cpu(),
            exponent=self.exponent.cpu(),
            histogram=self.histogram.cpu(),
            top_values=top_values,
            top_rows=top_rows,
            top_windows=top_windows,
            band_values=value,
            band_rows=rows.gather(-1, order),
            band_windows=windows.gather(2, order[..., None].expand(-1, -1, -1, s.window)),
            tokens=torch.cat(self.tokens),
            starts=torch.tensor(stream.starts, dtype=torch.long),
            contiguous=stream.contiguous,
            token_feature_ids=token_ids,
            token_feature_values=token_values,
            logits=logits,
            context=(s.before, s.after),
            texts=stream.texts,
        )


def _per_token_best(t: torch.Tensor, f: torch.Tensor, v: torch.Tensor, rows: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `m` most active latents of each of `rows` tokens (index, activation; -1 and 0 where fewer are active),
    from the non-zero activations `(t, f, v)`, which come grouped by token."""
    counts = torch.bincount(t, minlength=rows)
    width = int(counts.max()) if counts.numel() else 0
    if width and int(counts.min()) == width:  # as many active on every token (TopK): already a [rows, width] grid
        values, ids = v.view(rows, width), f.view(rows, width)
    else:
        slot = torch.arange(len(t), device=t.device) - (counts.cumsum(0) - counts)[t]
        values = torch.zeros((rows, width), device=v.device)
        ids = torch.full((rows, width), -1, dtype=f.dtype, device=f.device)
        values[t, slot] = v
        ids[t, slot] = f
    if width > m:
        values, pick = values.topk(m, dim=1)
        ids = ids.gather(1, pick)
    else:
        values, pick = values.sort(dim=1, descending=True)
        ids = ids.gather(1, pick)
        values = torch.nn.functional.pad(values, (0, m - width))
        ids = torch.nn.functional.pad(ids, (0, m - width), value=-1)
    return ids.to(torch.int32), values


# --- logit effects ---------------------------------------------------------------------------------------------------


class _LogitEffects:
    """Each latent's decoder direction through the unembedding: its most promoted and most suppressed tokens,
    computed from the weights when first asked for (they do not depend on the data).

    The direction is mapped to the residual stream first where the hook is not on it (`mlp.hook_post` through
    `W_out`, `attn.hook_z` through `W_O`), then through the final norm's centring (LayerNorm) and its scale γ, then
    `W_U`: `((d − mean d) ⊙ γ) @ W_U`, the direct effect on the logits of adding `d` to the last residual stream, up
    to the norm's per-token division. That is what TransformerLens's folded `W_U` gives (sae-dashboard and
    Neuronpedia use it), but for the centring, which TransformerLens moves into the weights that write to the
    residual stream rather than into the SAE's decoder. There are none without a model (a store alone), without an
    unembedding, or for a hook with no known linear way to the residual stream.
    """

    def __init__(self, model: Model | None, hook: str, directions: torch.Tensor, n: int):
        self.model, self.hook, self.directions, self.n = model, hook, directions, n
        self._effects: dict[str, torch.Tensor] | None = None
        self._done = False

    def get(self) -> dict[str, torch.Tensor] | None:
        """`top_ids`, `top_values`, `bottom_ids`, `bottom_values`, each `[latent, n]` (None when there are none)."""
        if not self._done:
            self._effects = self._compute()
            self._done = True
        return self._effects

    def _compute(self) -> dict[str, torch.Tensor] | None:
        from ..errors import WeightError

        if self.model is None or self.n == 0:
            return None
        try:
            W_U = self.model.W_U.detach()
        except WeightError:
            return None
        directions = _to_residual(self.model, self.hook, self.directions.to(W_U.device))
        if directions is None:
            return None
        norm = self.model._points.get("ln_final.hook_normalized")
        module = norm.module if norm is not None else None
        weight = getattr(module, "weight", None)
        if module is not None and "rms" not in type(module).__name__.lower():
            directions = directions - directions.mean(-1, keepdim=True)
        if isinstance(weight, torch.Tensor) and weight.shape == directions.shape[-1:]:
            directions = directions * weight.detach()
        n = min(self.n, W_U.shape[1])
        parts: dict[str, list[torch.Tensor]] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
        with torch.no_grad():
            for chunk in directions.split(_LOGIT_CHUNK):
                logits = chunk.to(W_U.dtype) @ W_U
                for side, largest in (("top", True), ("bottom", False)):
                    best = logits.topk(n, dim=1, largest=largest)
                    parts[f"{side}_ids"].append(best.indices.cpu())
                    parts[f"{side}_values"].append(best.values.float().cpu())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _to_residual(model: Model, hook: str, directions: torch.Tensor) -> torch.Tensor | None:
    """Decoder directions at `hook` as directions in the residual stream (None where there is no linear way)."""
    d_model = model.W_U.shape[0]
    layer = re.match(r"blocks\.(\d+)\.", hook)
    if hook.endswith("mlp.hook_post") and layer:
        W_out = model.weights.blocks[int(layer.group(1))].mlp.W_out.detach()
        return directions.to(W_out.dtype) @ W_out if directions.shape[-1] == W_out.shape[0] else None
    if hook.endswith("attn.hook_z") and layer:
        W_O = model.weights.blocks[int(layer.group(1))].attn.W_O.detach()  # [head, d_head, d_model]
        if directions.shape[-1] != W_O.shape[0] * W_O.shape[1]:
            return None
        return directions.to(W_O.dtype) @ W_O.flatten(0, 1)
    residual = hook.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                              "hook_embed", "hook_pos_embed"))
    return directions if residual and directions.shape[-1] == d_model else None
