"""Causal tracing (Meng et al., 2022, ROME): where along the layers and positions does a prompt's answer live?

The subject's token embeddings are corrupted with Gaussian noise (`noise` × the embedding matrix's standard
deviation, seeded); then each layer × position hidden state (`hook_resid_post`), or a window of MLP or attention
outputs around each layer, is restored to its clean value. The indirect effect of a cell is the answer's
probability after restoring it minus its probability in the corrupted run, averaged over prompts and over
`samples` noise draws (their spread is kept). Every noise draw is a copy of the prompts stacked in the batch, so
all draws run in the same forwards, with the patching engine's shortcuts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from ..inputs import Batch, Inputs, token_strings
from .cells import Cell, n_layers
from .engine import cached_run, sweep_cells
from .metrics import Answer, Context, TokenProbability
from .result import GridResult
from .sweep import MEMORY_BUDGET

KINDS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


class CausalTrace(GridResult):
    """Indirect effects of restoring each layer × position: `.values` (mean over prompts and noise draws),
    `.spread` (their standard deviation over draws), `.per_sample` `[layer, position, sample]`; `.clean` and
    `.corrupted` are the answer's probability in the clean and (mean) corrupted runs."""

    def __init__(self, per_sample, clean, corrupted, labels, subject, kind, window, model_name, forwards):
        self.per_sample = per_sample
        self.values = per_sample.mean(-1)
        self.spread = per_sample.std(-1) if per_sample.shape[-1] > 1 else torch.zeros_like(self.values)
        self.clean, self.corrupted = clean, corrupted
        self.axes = ["layer", "position"]
        self.labels = [[str(layer) for layer in range(per_sample.shape[0])], labels]
        self.subject, self.kind, self.window = subject, kind, window
        self.model_name, self.forwards = model_name, forwards

    def __repr__(self) -> str:
        return (
            f"CausalTrace({self.kind} on {self.model_name!r}, {len(self.labels[0])} layers × {len(self.labels[1])} "
            f"positions, {self.per_sample.shape[-1]} noise samples: p(answer) clean {self.clean:.3g}, corrupted "
            f"{self.corrupted:.3g}, strongest restoration {self.values.max():.3g})"
        )

    @property
    def description(self) -> str:
        what = "hidden state" if self.kind == "resid" else f"{self.kind} outputs over {self.window} layers"
        return f"causal tracing · restoring each {what} · indirect effect on p(answer) · {self.model_name}"

    def _note(self) -> str:
        return (
            f"p(answer): clean {self.clean:.3g}, subject noised {self.corrupted:.3g}; mean over "
            f"{self.per_sample.shape[-1]} noise samples (largest spread {self.spread.max():.3g}); * marks the subject"
        )


def causal_trace(
    model,
    prompts: Inputs,
    subject: str | Sequence[str] | Sequence[Sequence[int]],
    answer: Answer | None = None,
    *,
    kind: str = "resid",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    memory_budget: int = MEMORY_BUDGET,
    progress: bool | None = None,
) -> CausalTrace:
    """Trace where `prompts` keep what they know about `subject` (text found in each prompt, or its token
    positions per prompt). `answer`: the token whose probability is measured (default: each clean run's top
    prediction). `kind`: restore `"resid"` hidden states, or `"mlp"` / `"attn"` outputs over a `window` of layers
    centred on each layer."""
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    layers = n_layers(model)
    if kind not in KINDS:
        raise InputError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if samples < 1 or window < 1:
        raise InputError(f"samples and window must be at least 1, got samples={samples}, window={window}")
    batch = model._batch(prompts)
    n_prompts, length = batch.tokens.shape
    subject_positions = _subject_positions(model, batch, subject)
    clean = model.run(batch.tokens, attention_mask=batch.attention_mask, capture=f"blocks.*.{KINDS[kind]}")
    last = batch.last_positions.to(model.device)
    rows = torch.arange(n_prompts, device=last.device)
    answer = clean.logits[rows, last].argmax(-1) if answer is None else answer
    repeated = Batch(batch.tokens.repeat(samples, 1), batch.attention_mask.repeat(samples, 1)).to(model.device)
    noise_values = _noise(model, subject_positions, samples, length, noise, seed)
    noised = _adding(noise_values)
    cells, sources = _cells(model, kind, window, length, clean, samples)
    names = sorted({name for cell in cells for name, _ in cell.parts})
    target = cached_run(model, repeated, base=noised, capture=names)
    sample_rows = torch.arange(samples * n_prompts, device=last.device)
    context = Context(repeated.tokens, repeated.attention_mask, target.last, clean.logits[rows, last].repeat(samples, 1), model)
    evaluate = TokenProbability(_per_row(answer, n_prompts, samples), log=False).bind(context)
    corrupted = evaluate(target.logits[sample_rows, target.last], sample_rows)
    clean_probability = evaluate(clean.logits[rows, last].repeat(samples, 1), sample_rows)[:n_prompts].mean()
    targets = [tuple(target.captured[name][index] for name, index in cell.parts) for cell in cells]
    values, forwards = sweep_cells(
        model, cells, target, sources, targets, evaluate, "last",
        memory_budget=memory_budget, progress=progress, description=f"causal tracing ({kind})",
    )
    effect = (values - corrupted.cpu()).reshape(len(cells), samples, n_prompts).mean(-1)
    labels = token_strings(model.tokenizer, batch.tokens[0].tolist())
    marked = [f"{p} {label}{'*' if p in subject_positions[0] else ''}" for p, label in enumerate(labels)]
    per_sample = effect.reshape(layers, length, samples)
    return CausalTrace(
        per_sample, float(clean_probability), float(corrupted.mean()), marked, subject, kind, window, model.name, forwards
    )


def _subject_positions(model, batch: Batch, subject) -> list[list[int]]:
    """Each prompt's subject token positions: given, or where the subject's tokens occur in the prompt."""
    n_prompts = batch.tokens.shape[0]
    if isinstance(subject, str):
        subject = [subject] * n_prompts
    subject = list(subject)
    if len(subject) != n_prompts:
        raise InputError(f"{len(subject)} subjects given for {n_prompts} prompts (give one, or one per prompt)")
    found = []
    for i, (row, item) in enumerate(zip(batch.tokens.tolist(), subject)):
        if not isinstance(item, str):
            positions = [int(p) for p in item]
            if not positions or not all(0 <= p < len(row) for p in positions):
                raise InputError(f"subject positions {positions} of prompt {i} are outside its {len(row)} positions")
            found.append(positions)
            continue
        if model.tokenizer is None:
            raise InputError("a subject given as text needs a tokenizer: give its token positions instead")
        found.append(_find(row, item, model.tokenizer, i))
    return found


def _find(row: list[int], subject: str, tokenizer, prompt: int) -> list[int]:
    for text in (subject, " " + subject):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(len(row) - len(ids) + 1):
            if ids and row[start : start + len(ids)] == ids:
                return list(range(start, start + len(ids)))
    raise InputError(f"subject {subject!r} is not among the tokens of prompt {prompt}")


def _noise(model, positions: list[list[int]], samples: int, length: int, scale: float, seed: int) -> torch.Tensor:
    """Gaussian noise `[samples × prompts, pos, d_model]` on the subject positions only, `scale` × the embedding
    matrix's standard deviation, drawn with `seed`."""
    embedding = model._points["hook_embed"].module.weight
    std = scale * embedding.detach().float().std()
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(samples * len(positions), length, embedding.shape[1], generator=generator) * std
    keep = torch.zeros(len(positions), length, 1)
    for i, subject in enumerate(positions):
        keep[i, subject] = 1
    return (values * keep.repeat(samples, 1, 1)).to(embedding.device, embedding.dtype)


def _adding(noise: torch.Tensor):
    """The corrupted run's own intervention: the noise added to the token embeddings, for the rows and positions run."""

    def base(start: int, prompts: torch.Tensor) -> dict:
        added = noise[prompts, start:]
        return {"hook_embed": lambda activation, hook: activation + added}

    return base


def _per_row(answer: Answer, n_prompts: int, samples: int) -> list[int] | int | str:
    if isinstance(answer, torch.Tensor):
        answer = answer.tolist()
    if isinstance(answer, (int, str)):
        return answer
    answer = list(answer)
    if len(answer) != n_prompts:
        raise InputError(f"{len(answer)} answers given for {n_prompts} prompts (give one, or one per prompt)")
    return answer * samples


def _cells(model, kind: str, window: int, length: int, clean, samples: int) -> tuple[list[Cell], list[tuple]]:
    """One cell per layer × position restoring the clean hidden state (or the window of outputs) there."""
    layers = n_layers(model)
    cells, sources = [], []
    for layer in range(layers):
        span = [layer] if kind == "resid" else range(max(0, layer - window // 2), min(layers, layer - window // 2 + window))
        names = [f"blocks.{l}.{KINDS[kind]}" for l in span]
        for p in range(length):
            index = (slice(None), p)
            parts = tuple((name, index) for name in names[1:])
            cells.append(Cell(names[0], min(span), index, p, parts))
            sources.append(tuple(clean[name][index].repeat(samples, 1) for name in names))
    return cells, sources
