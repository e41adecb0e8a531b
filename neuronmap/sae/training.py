"""`train`: fit a sparse autoencoder to the activations at one hook point of a model (or to an activation store's,
or to a tensor of them), reproducibly from a seed, with live progress, a training log that renders and plots, and
checkpoints SAELens reads.

    sae = nm.sae.train(model, "blocks.0.hook_resid_post", texts, architecture="topk", d_sae=512, k=16,
                       tokens=200_000, seed=0)
    sae.training_log            # the curves: a table inline, .figure() to plot them

`Trainer` is the optimisation itself, one `step(batch)` at a time, for those who bring their own loop.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InputError, SAEError
from . import losses
from .autoencoder import SAE
from .config import SAEConfig
from .history import TrainingLog
from .steps import StepLoss, forward_backward
from .streams import open_stream

LR_SCHEDULES = ("linear", "cosine", "constant")
B_DEC_INITS = ("geometric_median", "mean", None)
_INIT_ROWS = 16384  # rows the input scale and b_dec's initial value are estimated from (rounded up to whole batches)
_LOG_ROWS = 500  # about this many logged steps per run by default
SPARSE_BELOW = 0.05  # a standard SAE's step runs on its active entries once fewer than this fraction fire
_COUNT_EVERY = 16  # steps between counts of a standard SAE's active entries (to notice when it turns sparse)


def train(
    source: Any,
    hook_name: str | None = None,
    inputs: Any = None,
    *,
    sae: SAE | None = None,
    architecture: str | None = None,
    d_sae: int | None = None,
    k: int | None = None,
    tokens: int = 1_000_000,
    batch_size: int = 4096,
    lr: float = 3e-4,
    lr_warmup_steps: int = 0,
    lr_decay_steps: int | None = None,
    lr_schedule: str = "linear",
    l1_coefficient: float = 5.0,
    l1_by_decoder_norm: bool = True,
    l0_coefficient: float = 1.0,
    sparsity_warmup_steps: int | None = None,
    bandwidth: float = 0.05,
    initial_threshold: float = 0.01,
    threshold_rate: float = 0.01,
    aux_k: int | None = None,
    aux_coefficient: float | None = None,
    dead_after_tokens: int | None = None,
    unit_norm_decoder: bool | None = None,
    max_grad_norm: float | None = None,
    normalize_inputs: bool = True,
    b_dec_init: str | None = "geometric_median",
    context_length: int | None = None,
    model_batch_size: int = 16,
    buffer_tokens: int | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    log_every: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> SAE:
    """Train a sparse autoencoder on `tokens` activations and return it (in eval mode, reading raw activations).

    **Data.** `source` is a `Model` (or anything `neuronmap.load` takes) with `hook_name` and `inputs` (a list of
    strings, a text or JSON-lines file, token ids: anything `nm.extract` reads), run `model_batch_size` windows of
    `context_length` tokens (default 128) at a time into a shuffled buffer of `buffer_tokens` activations (default
    16 batches) of which half is served per refill; padding is never trained on. Or an `ActivationStore` (or its path;
    `hook_name` may be left out when it holds one hook), read in its own shuffled minibatches. Or a float tensor of
    activations `[rows, d_in]`, reshuffled every pass. Data that runs out is read again from the start (a warning
    says so). Training takes `ceil(tokens / batch_size)` full batches.

    **The SAE.** A new one (`architecture` "topk" by default, "batchtopk", "standard" (ReLU + L1) or "jumprelu";
    `d_sae` default 8 × d_in, `k` default min(32, d_sae)) initialised from `seed`, or `sae=` to train further.

    **Loss** (see `losses`): squared error summed over features and averaged over tokens; plus for standard SAEs
    `l1_coefficient` × L1 of the latents weighted by decoder norms (`l1_by_decoder_norm`, Anthropic's April 2024
    recipe); for JumpReLU `l0_coefficient` × L0 through the paper's pseudo-derivative with kernel width `bandwidth`
    (thresholds start at `initial_threshold`); the L1/L0 coefficient rises linearly over `sparsity_warmup_steps`
    (default 5% of the steps). The auxiliary-k loss (`aux_coefficient`, default 1/32 for TopK and BatchTopK, 0
    otherwise) lets the top `aux_k` (default d_in / 2) dead latents reconstruct the residual; a latent is dead once
    it has not fired for `dead_after_tokens` tokens (default a tenth of the run, at most 10M). BatchTopK's inference
    threshold follows the smallest kept activation of each batch (their mean over the first 1 / `threshold_rate`
    batches, then an exponential moving average at that rate).

    **Optimisation.** Adam (β 0.9, 0.999) at `lr`, warmed up linearly over `lr_warmup_steps`, decayed to 0 over the
    last `lr_decay_steps` (default: 20% of the steps for "linear", every step after warm-up for "cosine"; "constant"
    never decays); gradients optionally clipped to `max_grad_norm`. Decoder rows are kept at unit norm, the gradient
    along each row removed first (`unit_norm_decoder`, default on except for a standard SAE with
    `l1_by_decoder_norm`, whose decoder rows start at norm 0.1 and are free). With `normalize_inputs`, activations
    are scaled by one constant so their mean norm is √d_in (SAELens's "expected_average_only_in"), which makes the
    coefficients and learning rate carry across models and layers; the scale is folded into the weights at the end
    and in every checkpoint. `b_dec` starts at the geometric median (Weiszfeld) or the mean of the first 16k
    activations, or stays at 0 (`b_dec_init=None`; it is left alone on an SAE passed in).

    **Running.** `device` (default: the SAE's, the model's or the tensor's, else CPU); the same `seed` gives the
    same SAE bit for bit on a CPU. A progress bar shows L0, MSE, explained variance and the dead fraction as it
    goes; every `log_every` steps (default: about 500 rows per run) a row goes to the training log, which the SAE
    returns as `sae.training_log` and whose settings and final row go to `sae.cfg.metadata["training"]`. With
    `checkpoint_dir`, the SAE is saved in SAELens's format every `checkpoint_every` tokens (`tokens_<n>/`) and at
    the end (`final/`), with `training_log.json` beside them. A non-finite loss stops training with an `SAEError`
    naming the step (`error.step`): the SAE (`error.sae`) keeps the weights it had before that step, and the
    checkpoints already written stay.
    """
    _check_settings(locals())
    if sae is not None and not isinstance(sae, SAE):
        raise SAEError(f"sae must be a neuronmap SAE, not a {type(sae).__name__}")
    new = sae is None
    if new:  # architecture, d_sae and k are checked before any forward pass
        architecture = architecture or "topk"
        k_or_default = k if k is not None or architecture not in ("topk", "batchtopk") else 1
        SAEConfig(architecture, 1, d_sae if d_sae is not None else max(k_or_default or 1, 1), k=k_or_default)
    run_device = _device(device, sae, source)
    steps = math.ceil(tokens / batch_size)
    stream = open_stream(source, hook_name, inputs, batch_size=batch_size, tokens=tokens, seed=seed,
                         device=run_device, dtype=getattr(torch, dtype if new else sae.cfg.dtype),
                         context_length=context_length, model_batch_size=model_batch_size, buffer_tokens=buffer_tokens)
    first = [next(stream.batches) for _ in range(min(steps, -(-_INIT_ROWS // batch_size)))]
    if new:
        sae = _new_sae(architecture, stream, d_sae, k, seed, dtype).to(run_device)
    else:
        _check_given(sae, stream, architecture, d_sae, k)
        sae.to(run_device)
    arch = sae.cfg.architecture
    unit_norm = unit_norm_decoder if unit_norm_decoder is not None else not (arch == "standard" and l1_by_decoder_norm)
    sample = torch.cat(first)
    scalable = normalize_inputs and sae.cfg.normalize_activations in ("none", "expected_average_only_in")
    scale = _input_scale(sample) if scalable else 1.0
    trainer = Trainer(
        sae, steps, lr=lr, lr_warmup_steps=lr_warmup_steps, lr_decay_steps=lr_decay_steps, lr_schedule=lr_schedule,
        l1_coefficient=l1_coefficient, l1_by_decoder_norm=l1_by_decoder_norm, l0_coefficient=l0_coefficient,
        sparsity_warmup_steps=sparsity_warmup_steps, threshold_rate=threshold_rate, aux_k=aux_k,
        aux_coefficient=aux_coefficient, dead_after_tokens=dead_after_tokens if dead_after_tokens is not None else
        min(10_000_000, max(batch_size, steps * batch_size // 10)), unit_norm_decoder=unit_norm,
        max_grad_norm=max_grad_norm,
    )
    sae.bandwidth = bandwidth
    settings = {**_settings(sae, stream, steps * batch_size, batch_size, seed, scale,
                            b_dec_init if new else "kept"), **trainer.settings()}
    run = _Run(trainer, TrainingLog(settings=settings), scale, checkpoint_dir, checkpoint_every,
               log_every or max(1, round(steps / _LOG_ROWS)))
    stopped = "interrupted"
    bar = tqdm(total=steps * batch_size, unit="tok", unit_scale=True, desc=f"training {arch} SAE",
               disable=not progress, dynamic_ncols=True)
    try:
        _prepare(sae, new, scale, sample * scale, b_dec_init, unit_norm, initial_threshold)
        batches = itertools.chain(first, stream.batches)
        for index in range(steps):
            run.step(next(batches), last=index == steps - 1, bar=bar)
        stopped = "completed"
    except _Diverged as diverged:
        stopped = f"diverged: the loss was {diverged.value} at step {diverged.step:,}"
        error = SAEError(
            f"training stopped: the loss became {diverged.value} at step {diverged.step:,} (after "
            f"{trainer.tokens:,} tokens); the SAE (error.sae) keeps its weights from before that step"
            + (f", and the last checkpoint is {run.last_checkpoint}" if run.last_checkpoint else "")
            + ". Lower lr (or set max_grad_norm), or look for inf/NaN in the activations"
        )
        error.sae, error.step, error.tokens = sae, diverged.step, trainer.tokens
        raise error from None
    finally:
        bar.close()
        run.finish(stopped, stream.passes())
    return sae


class Trainer:
    """An SAE's optimisation: Adam, the learning-rate and coefficient schedules, the decoder's unit-norm constraint,
    BatchTopK's threshold and JumpReLU's threshold floor, and how long ago each latent fired. `step(batch)` trains on
    one batch; `total_steps` sets the schedules' length. Settings as `train`'s (`dead_after_tokens` required)."""

    def __init__(self, sae: SAE, total_steps: int, *, lr: float = 3e-4, lr_warmup_steps: int = 0,
                 lr_decay_steps: int | None = None, lr_schedule: str = "linear", l1_coefficient: float = 5.0,
                 l1_by_decoder_norm: bool = True, l0_coefficient: float = 1.0, sparsity_warmup_steps: int | None = None,
                 threshold_rate: float = 0.01, aux_k: int | None = None, aux_coefficient: float | None = None,
                 dead_after_tokens: int = 10_000_000, unit_norm_decoder: bool = True,
                 max_grad_norm: float | None = None, by_hand: bool = True):
        arch = sae.cfg.architecture
        self.sae = sae
        self.total_steps = total_steps
        self.lr = lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_schedule = lr_schedule
        default_decay = {"linear": total_steps // 5, "cosine": total_steps - lr_warmup_steps, "constant": 0}[lr_schedule]
        self.lr_decay_steps = min(total_steps, lr_decay_steps if lr_decay_steps is not None else default_decay)
        self.coefficient = {"standard": l1_coefficient, "jumprelu": l0_coefficient}.get(arch, 0.0)
        self.l1_by_decoder_norm = l1_by_decoder_norm
        self.sparsity_warmup_steps = (sparsity_warmup_steps if sparsity_warmup_steps is not None
                                      else total_steps // 20 if self.coefficient else 0)
        self.threshold_rate = threshold_rate
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient if aux_coefficient is not None else (
            1 / 32 if arch in ("topk", "batchtopk") else 0.0)
        self.dead_after_tokens = dead_after_tokens
        self.unit_norm_decoder = unit_norm_decoder
        self.max_grad_norm = max_grad_norm
        self.by_hand = by_hand
        self.parameters = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec] + ([sae.threshold] if arch == "jumprelu" else [])
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters) or None
        self.optimizer = torch.optim.Adam(self.parameters, lr=lr, betas=(0.9, 0.999), fused=fused)
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_enc.device)
        self.density = 1.0  # the fraction of (token, latent) pairs active when last counted
        self.steps = 0
        self.tokens = 0

    def settings(self) -> dict[str, Any]:
        """The resolved hyperparameters (JSON), as the SAE's metadata records them."""
        names = ("lr", "lr_warmup_steps", "lr_decay_steps", "lr_schedule", "sparsity_warmup_steps", "threshold_rate",
                 "aux_k", "aux_coefficient", "dead_after_tokens", "unit_norm_decoder", "max_grad_norm")
        out = {name: getattr(self, name) for name in names}
        arch = self.sae.cfg.architecture
        if arch == "standard":
            out.update(l1_coefficient=self.coefficient, l1_by_decoder_norm=self.l1_by_decoder_norm)
        elif arch == "jumprelu":
            out.update(l0_coefficient=self.coefficient, bandwidth=self.sae.bandwidth)
        return out

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (from 0): linear warm-up, constant, then linear or cosine decay to 0."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        decay_start = self.total_steps - self.lr_decay_steps
        if self.lr_decay_steps and step >= decay_start:
            left = (self.total_steps - step) / self.lr_decay_steps  # 1 at the decay's first step, → 0 at the end
            return self.lr * (left if self.lr_schedule != "cosine" else 0.5 * (1 - math.cos(math.pi * left)))
        return self.lr

    def coefficient_at(self, step: int) -> float:
        """The L1 / L0 coefficient of step `step`: linear warm-up from 0, then constant."""
        if step < self.sparsity_warmup_steps:
            return self.coefficient * (step + 1) / self.sparsity_warmup_steps
        return self.coefficient

    @property
    def dead(self) -> torch.Tensor:
        """Latents that have not fired for `dead_after_tokens` tokens (bool `[d_sae]`)."""
        return self.since_fired >= self.dead_after_tokens

    def step(self, x: torch.Tensor, measure: bool = True) -> StepLoss:
        """Train on one batch `x [tokens, d_in]` (in the SAE's training units) and return its loss terms (with the
        count of active latents if `measure`). Raises `_Diverged` before touching the weights if the loss is not
        finite."""
        sae, arch = self.sae, self.sae.cfg.architecture
        coefficient = self.coefficient_at(self.steps)
        standard = arch == "standard"
        out = forward_backward(
            sae, x, l1_coefficient=coefficient if standard else 0.0, l1_by_decoder_norm=self.l1_by_decoder_norm,
            l0_coefficient=coefficient if arch == "jumprelu" else 0.0,
            dead=self.dead if self.aux_coefficient else None, aux_k=self.aux_k, aux_coefficient=self.aux_coefficient,
            by_hand=self.by_hand, measure=measure or (standard and self.steps % _COUNT_EVERY == 0),
            sparse=standard and self.density < SPARSE_BELOW,
        )
        if standard and out.active is not None:
            self.density = float(out.active) / out.fired.numel() / x.shape[0]
        if not torch.isfinite(out.total):
            for parameter in self.parameters:
                parameter.grad = None
            raise _Diverged(self.steps + 1, float(out.total))
        if self.unit_norm_decoder:
            losses.remove_parallel_gradient(sae)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.param_groups[0]["lr"] = self.lr_at(self.steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.unit_norm_decoder:
                losses.renormalize_decoder(sae)
            if arch == "jumprelu":
                sae.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations (SAELens)
            elif arch == "batchtopk":
                losses.update_batchtopk_threshold(sae, out.kept, max(self.threshold_rate, 1 / (self.steps + 1)))
            self.since_fired.add_(x.shape[0]).masked_fill_(out.fired, 0)
        self.steps += 1
        self.tokens += x.shape[0]
        return out


class _Diverged(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(step, value)
        self.step, self.value = step, value


class _Run:
    """One `train` call's bookkeeping around the trainer: input scaling, the log, progress, checkpoints, the end."""

    def __init__(self, trainer: Trainer, log: TrainingLog, scale: float, checkpoint_dir: str | os.PathLike | None,
                 checkpoint_every: int | None, log_every: int):
        self.trainer, self.log, self.scale = trainer, log, scale
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.log_every = checkpoint_every, log_every
        self.last_checkpoint: Path | None = None
        self.next_checkpoint = checkpoint_every

    def step(self, x: torch.Tensor, last: bool, bar: tqdm) -> None:
        trainer = self.trainer
        if self.scale != 1.0:
            x = x * self.scale
        logged = trainer.steps % self.log_every == 0 or last
        lr, coefficient = trainer.lr_at(trainer.steps), trainer.coefficient_at(trainer.steps)
        out = trainer.step(x, measure=logged)
        bar.update(x.shape[0])
        if logged:
            self._log(x, out, lr, coefficient, bar)
        if self.checkpoint_dir is not None and self.next_checkpoint is not None and trainer.tokens >= self.next_checkpoint:
            self.save(self.checkpoint_dir / f"tokens_{trainer.tokens}")
            while self.next_checkpoint <= trainer.tokens:
                self.next_checkpoint += self.checkpoint_every

    def _log(self, x: torch.Tensor, out: StepLoss, lr: float, coefficient: float, bar: tqdm) -> None:
        trainer = self.trainer
        n, d_in = x.shape
        with torch.no_grad():
            variance = (x - x.mean(0)).pow(2).sum()
            values = torch.stack([out.total, out.mse, out.sparsity, out.aux, out.active.to(out.mse.dtype) / n,
                                  out.mse / (d_in * self.scale**2), 1 - out.mse * n / variance,
                                  trainer.dead.to(out.mse.dtype).mean()]).tolist()
        names = ("loss", "mse_loss", "sparsity_loss", "aux_loss", "l0", "mse", "explained_variance", "dead_fraction")
        row = {"step": trainer.steps, "tokens": trainer.tokens, **dict(zip(names, values)), "lr": lr,
               "sparsity_coefficient": coefficient}
        self.log.append(row)
        bar.set_postfix_str(f"L0 {row['l0']:.1f}, MSE {row['mse']:.3g}, explained var {row['explained_variance']:.3f}, "
                            f"dead {row['dead_fraction']:.1%}", refresh=False)

    def save(self, folder: Path) -> None:
        """Write the SAE as it would be returned now (scale folded, metadata set) and the log beside it."""
        copy_ = copy.deepcopy(self.trainer.sae)
        _fold_scale(copy_, self.scale)
        _record(copy_, self.log, "checkpoint", None)
        copy_.eval()
        copy_.save(folder)
        self.log.save(folder.parent / "training_log.json")
        self.last_checkpoint = folder

    def finish(self, stopped: str, passes: int) -> None:
        """Leave the SAE ready to use whatever happened: scale folded, metadata and log attached, eval mode; save
        the final checkpoint if training completed."""
        sae = self.trainer.sae
        _fold_scale(sae, self.scale)
        self.scale = 1.0
        self.log.settings["passes_over_data"] = passes
        _record(sae, self.log, stopped, passes)
        sae.eval()
        sae.training_log = self.log
        if stopped == "completed" and self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir / "final")


def geometric_median(x: torch.Tensor, iterations: int = 100, tolerance: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of `x [rows, d]` (Weiszfeld's iterations from
    the mean, in float64 where the device has it), returned in `x`'s dtype."""
    points = _wide(x)
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-12)
        updated = (weights @ points) / weights.sum()
        moved = float((updated - median).norm())
        median = updated
        if moved <= tolerance * max(float(median.norm()), 1e-12):
            break
    return median.to(x.dtype)


# --- setting up ------------------------------------------------------------------------------------------------------


def _device(device: str | torch.device | None, sae: SAE | None, source: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if sae is not None:
        return sae.W_enc.device
    if isinstance(source, torch.Tensor):
        return source.device
    from ..model import Model

    return source.device if isinstance(source, Model) else torch.device("cpu")


def _new_sae(architecture: str, stream: Any, d_sae: int | None, k: int | None, seed: int, dtype: str) -> SAE:
    d_sae = d_sae if d_sae is not None else 8 * stream.d_in
    if architecture in ("topk", "batchtopk") and k is None:
        k = min(32, d_sae)
    cfg = SAEConfig(architecture, stream.d_in, d_sae, k=k, hook_name=stream.hook_name, model_name=stream.model_name,
                    reshape_activations=stream.reshape, dtype=dtype)
    return SAE(cfg, seed=seed)


def _check_given(sae: SAE, stream: Any, architecture: str, d_sae: int | None, k: int | None) -> None:
    cfg = sae.cfg
    where = f" at {stream.hook_name!r}" if stream.hook_name else ""
    if cfg.d_in != stream.d_in:
        raise SAEError(f"the SAE reads d_in={cfg.d_in} features but the activations{where} have {stream.d_in}")
    for name, value in (("architecture", architecture), ("d_sae", d_sae), ("k", k)):
        if value is not None and value != getattr(cfg, name):
            raise SAEError(f"the SAE passed has {name}={getattr(cfg, name)!r}, not {value!r}: leave {name} out to train it")
    if cfg.hook_name and stream.hook_name and cfg.hook_name != stream.hook_name:
        raise SAEError(f"the SAE was made for {cfg.hook_name!r}, not {stream.hook_name!r}")


def _input_scale(sample: torch.Tensor) -> float:
    """√d_in / the mean norm of the sample: the factor that gives activations a mean norm of √d_in."""
    mean_norm = float(_wide(sample).norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm == 0:
        raise SAEError(f"the first activations have a mean norm of {mean_norm}: they cannot be scaled (normalize_inputs=False "
                       "trains on them as they are)")
    return math.sqrt(sample.shape[-1]) / mean_norm


@torch.no_grad()
def _prepare(sae: SAE, new: bool, scale: float, sample: torch.Tensor, b_dec_init: str | None, unit_norm: bool,
             initial_threshold: float) -> None:
    """Put the SAE in training units (inputs × `scale`) and give a new one its data-dependent start."""
    arch = sae.cfg.architecture
    if not new:
        _fold_scale(sae, 1.0 / scale)  # the same SAE, now reading scaled inputs
        if unit_norm:
            sae.normalize_decoder()  # the same SAE again, its decoder rows at unit norm
        return
    if b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample))
    elif b_dec_init == "mean":
        sae.b_dec.copy_(sample.mean(0))
    if arch == "standard" and not unit_norm:  # Anthropic's April 2024 start: decoder rows at norm 0.1, W_enc = W_decᵀ
        sae.W_dec.mul_(0.1)
        sae.W_enc.copy_(sae.W_dec.T)
    if arch == "jumprelu":
        sae.threshold.fill_(initial_threshold)


@torch.no_grad()
def _fold_scale(sae: SAE, scale: float) -> None:
    """Turn an SAE for inputs × `scale` into the same SAE for raw inputs: pre-activations, and so thresholds, are
    unchanged, the reconstruction is divided by `scale` (and decoder-norm-rescaled pre-activations with it, so a
    BatchTopK threshold in those units is too, as SAELens folds it)."""
    if scale == 1.0:
        return
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)
    if sae.cfg.architecture == "batchtopk" and sae.cfg.rescale_acts_by_decoder_norm:
        sae.threshold.div_(scale)


def _settings(sae: SAE, stream: Any, tokens: int, batch_size: int, seed: int, scale: float,
              b_dec_init: str | None) -> dict[str, Any]:
    from .. import __version__

    cfg = sae.cfg
    return {"library": f"neuronmap {__version__}", "architecture": cfg.architecture, "d_in": cfg.d_in,
            "d_sae": cfg.d_sae, "k": cfg.k, "hook_name": stream.hook_name, "model_name": stream.model_name,
            "tokens": tokens, "batch_size": batch_size, "seed": seed, "input_scale": scale, "b_dec_init": b_dec_init,
            "data": stream.description}


def _record(sae: SAE, log: TrainingLog, stopped: str, passes: int | None) -> None:
    """The SAE's metadata: SAELens's fields (model, hook, context size) and a `training` record."""
    cfg = sae.cfg
    settings = log.settings
    cfg.hook_name = cfg.hook_name or settings.get("hook_name")
    cfg.model_name = cfg.model_name or settings.get("model_name")
    if settings.get("input_scale", 1.0) != 1.0:
        cfg.normalize_activations = "expected_average_only_in"  # SAELens: a scale already folded into the weights
    context = settings.get("data", {}).get("context_size")
    if context is not None:
        cfg.metadata["context_size"] = context
    last = log.last
    cfg.metadata["training"] = {
        **settings, "stopped": stopped, "steps": int(last.get("step", 0)), "tokens_trained": int(last.get("tokens", 0)),
        "final": {name: last[name] for name in ("l0", "mse", "explained_variance", "dead_fraction") if name in last},
    }


def _wide(x: torch.Tensor) -> torch.Tensor:
    """`x` in float64 for sums over many rows (float32 on Apple's MPS, which has no float64)."""
    return x.float() if x.device.type == "mps" else x.double()


def _check_settings(arguments: dict[str, Any]) -> None:
    for name in ("tokens", "batch_size", "model_batch_size"):
        value = arguments[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(arguments["seed"], int) or isinstance(arguments["seed"], bool):
        raise InputError(f"seed must be an int, got {arguments['seed']!r}")
    for name in ("lr_warmup_steps", "lr_decay_steps", "sparsity_warmup_steps", "dead_after_tokens", "aux_k",
                 "checkpoint_every", "log_every", "buffer_tokens", "context_length"):
        value = arguments[name]
        minimum = 1 if name in ("aux_k", "checkpoint_every", "log_every", "buffer_tokens", "context_length") else 0
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise InputError(f"{name} must be {'a positive' if minimum else 'a non-negative'} int or None, got {value!r}")
    for name in ("lr", "bandwidth", "threshold_rate"):
        value = arguments[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise InputError(f"{name} must be a positive number, got {value!r}")
    if arguments["threshold_rate"] > 1:
        raise InputError(f"threshold_rate is a moving-average rate in (0, 1], got {arguments['threshold_rate']!r}")
    for name in ("l1_coefficient", "l0_coefficient", "aux_coefficient", "max_grad_norm", "initial_threshold"):
        value = arguments[name]
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf):
            raise InputError(f"{name} must be a non-negative number, got {value!r}")
    if arguments["lr_schedule"] not in LR_SCHEDULES:
        raise InputError(f"lr_schedule {arguments['lr_schedule']!r} is not one of {', '.join(map(repr, LR_SCHEDULES))}")
    if arguments["b_dec_init"] not in B_DEC_INITS:
        raise InputError(f"b_dec_init {arguments['b_dec_init']!r} is not one of {', '.join(map(repr, B_DEC_INITS))}")
    if arguments["checkpoint_every"] is not None and arguments["checkpoint_dir"] is None:
        raise InputError("checkpoint_every needs checkpoint_dir: where to write the checkpoints")
