"""How good an SAE is on real text: sparsity, reconstruction, dead and dense latents, and what splicing it in costs
the model (cross-entropy recovered against zero-ablation, KL to the clean run), in one pass over the inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..display import Renders, html_table
from ..errors import InputError
from ..histogram import histogram_figure, histogram_svg
from ..inputs import pad_id
from ..store.sources import Source, token_batches
from .autoencoder import SAE

DENSITY_BINS = 40


def evaluate(sae: SAE, model: Any, inputs: Source, *, hook_name: str | None = None, context: int = 128,
             batch_size: int = 16, dense_threshold: float = 0.1, progress: bool = True) -> SAEMetrics:
    """Measure `sae` at its hook in `model` over every real token of `inputs` (anything `nm.extract` reads: strings,
    a text file, token ids), cut into windows of `context` tokens, `batch_size` windows per forward pass.

    Per token: L0, MSE, explained variance, cosine of input and reconstruction. Per latent: how often it fires
    (dead: never in the window; dense: on more than `dense_threshold` of tokens). The model's next-token loss three
    times: clean, with the reconstruction in place of the activation, and with the activation zeroed; from them
    CE loss recovered = (zero − spliced) / (zero − clean), and the mean KL(clean ‖ spliced) per token.
    """
    hook = hook_name or sae.cfg.hook_name
    if hook is None:
        raise InputError("the SAE names no hook (cfg.hook_name): pass hook_name=")
    model.resolve(hook)
    if not 0 < dense_threshold < 1:
        raise InputError(f"dense_threshold is a fraction of tokens in (0, 1), got {dense_threshold!r}")
    totals = _Totals(sae.cfg.d_sae)
    batches = token_batches(inputs, model.tokenizer, pad_id(model.tokenizer), context, batch_size)
    bar = tqdm(batches, desc="evaluating SAE", unit="batch", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for batch in bar:
            _measure(sae, model, hook, batch.tokens, batch.mask, totals)
            bar.set_postfix_str(f"{totals.tokens:,} tokens", refresh=False)
    if totals.tokens == 0:
        raise InputError("the inputs hold no tokens to evaluate on")
    return totals.result(sae, model.name, hook, dense_threshold)


def _measure(sae: SAE, model: Any, hook: str, tokens: torch.Tensor, mask: torch.Tensor, totals: _Totals) -> None:
    clean = model.run(tokens, attention_mask=mask, capture=hook)
    real = mask.bool().to(clean[hook].device)
    x = clean[hook][real].flatten(1).to(sae.W_enc.dtype)
    acts = sae.encode(x)  # (an SAEError naming both widths when they differ)
    recons = sae.decode(acts)
    totals.add_reconstruction(x.double(), recons.double(), acts)
    spliced = model.run(tokens, attention_mask=mask, saes={hook: sae}).output.logits
    zeroed = model.run(tokens, attention_mask=mask, interventions={hook: lambda a, h: torch.zeros_like(a)}).output.logits
    totals.add_losses(tokens, mask, clean.output.logits, spliced, zeroed)


@dataclass
class _Totals:
    """Running sums over the window (float64), so the result does not depend on how the tokens were batched."""

    d_sae: int
    tokens: int = 0
    l0: float = 0.0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    cosine: float = 0.0
    input_sum: torch.Tensor | None = None
    fired: torch.Tensor | None = None
    loss_tokens: int = 0
    loss: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0})

    def add_reconstruction(self, x: torch.Tensor, recons: torch.Tensor, acts: torch.Tensor) -> None:
        active = acts > 0
        self.tokens += x.shape[0]
        self.l0 += float(active.sum())
        self.squared_error += float((x - recons).pow(2).sum())
        self.squared_norm += float(x.pow(2).sum())
        self.cosine += float(torch.nn.functional.cosine_similarity(x, recons, dim=-1).sum())
        sums = x.sum(0).cpu()
        counts = active.sum(0).cpu().long()
        self.input_sum = sums if self.input_sum is None else self.input_sum + sums
        self.fired = counts if self.fired is None else self.fired + counts

    def add_losses(self, tokens, mask, clean, spliced, zeroed) -> None:
        counted = (mask[:, 1:] * mask[:, :-1]).bool().to(clean.device)
        targets = tokens[:, 1:].to(clean.device)
        logs = {name: logits[:, :-1].double().log_softmax(-1) for name, logits in
                (("clean", clean), ("spliced", spliced), ("zero", zeroed))}
        for name, log_probs in logs.items():
            losses = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            self.loss[name] += float(losses[counted].sum())
        kl = (logs["clean"].exp() * (logs["clean"] - logs["spliced"])).sum(-1)
        self.loss["kl"] += float(kl[counted].sum())
        self.loss_tokens += int(counted.sum())

    def result(self, sae: SAE, model_name: str, hook: str, dense_threshold: float) -> SAEMetrics:
        n = self.tokens
        mean = self.input_sum / n
        total_variance = self.squared_norm - n * float(mean.pow(2).sum())
        density = self.fired.double() / n
        per_token = max(self.loss_tokens, 1)
        clean, spliced, zero = (self.loss[k] / per_token for k in ("clean", "spliced", "zero"))
        return SAEMetrics(
            sae=repr(sae), model=model_name, hook=hook, tokens=n,
            l0=self.l0 / n, mse=self.squared_error / (n * sae.cfg.d_in),
            explained_variance=1 - self.squared_error / total_variance if total_variance > 0 else math.nan,
            cosine=self.cosine / n,
            dead_fraction=float((self.fired == 0).double().mean()),
            dense_fraction=float((density > dense_threshold).double().mean()),
            dense_threshold=dense_threshold,
            ce_clean=clean, ce_spliced=spliced, ce_zero_ablation=zero,
            ce_loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else math.nan,
            kl_divergence=self.loss["kl"] / per_token,
            density=density.float(),
        )


@dataclass
class SAEMetrics(Renders):
    """An SAE's measurements over a token window: a table, the histogram of latents' firing frequencies
    (log10, dead latents counted apart), `.figure()`, `.to_dict()`."""

    sae: str
    model: str
    hook: str
    tokens: int
    l0: float
    mse: float
    explained_variance: float
    cosine: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_loss_recovered: float
    kl_divergence: float
    density: torch.Tensor  # [d_sae] fraction of tokens each latent fires on

    def to_dict(self) -> dict[str, float]:
        """The scalar measurements by name."""
        return {name: value for name, value in vars(self).items() if isinstance(value, (int, float))}

    def density_histogram(self) -> tuple[list[int], list[float]]:
        """(counts, edges) of log10 firing frequency over the latents that fire at least once."""
        alive = self.density[self.density > 0].double().log10()
        low = math.floor(min(float(alive.min()), -1)) if len(alive) else -6.0
        edges = torch.linspace(low, 0.0, DENSITY_BINS + 1, dtype=torch.float64)
        counts = torch.histc(alive, bins=DENSITY_BINS, min=low, max=0.0) if len(alive) else torch.zeros(DENSITY_BINS)
        return [int(c) for c in counts.tolist()], edges.tolist()

    def figure(self) -> Any:
        """A plotly histogram of the latents' log10 firing frequency."""
        counts, edges = self.density_histogram()
        return histogram_figure(counts, edges, title=self._density_title(), x_label="log10 firing frequency")

    def __repr__(self) -> str:
        return (
            f"SAEMetrics({self.sae} at {self.hook!r} over {self.tokens:,} tokens: L0 {self.l0:.1f}, "
            f"explained variance {self.explained_variance:.3f}, CE loss recovered {self.ce_loss_recovered:.3f}, "
            f"dead {self.dead_fraction:.1%})"
        )

    def _repr_html_(self) -> str:
        rows = [
            ("L0 (latents active per token)", f"{self.l0:.2f}"),
            ("MSE (per feature)", f"{self.mse:.4g}"),
            ("explained variance", f"{self.explained_variance:.4f}"),
            ("cosine(input, reconstruction)", f"{self.cosine:.4f}"),
            ("dead latents (never fired)", f"{self.dead_fraction:.2%}"),
            (f"dense latents (> {self.dense_threshold:.0%} of tokens)", f"{self.dense_fraction:.2%}"),
            ("CE loss, clean", f"{self.ce_clean:.4f}"),
            ("CE loss, SAE spliced in", f"{self.ce_spliced:.4f}"),
            ("CE loss, hook zero-ablated", f"{self.ce_zero_ablation:.4f}"),
            ("CE loss recovered", f"{self.ce_loss_recovered:.4f}"),
            ("KL(clean ‖ spliced) per token", f"{self.kl_divergence:.4g}"),
        ]
        caption = f"{self.sae} at {self.hook} of {self.model}, {self.tokens:,} tokens"
        counts, edges = self.density_histogram()
        dead = int((self.density == 0).sum())
        chart = histogram_svg(counts, edges, title=self._density_title(), x_label="log10 firing frequency",
                              note=f"{dead:,} dead latents not shown")
        return f'<div class="nm-sae-metrics">{html_table(caption, ["metric", "value"], rows, numeric=[1])}{chart}</div>'

    def _density_title(self) -> str:
        return f"feature density of {len(self.density):,} latents"
