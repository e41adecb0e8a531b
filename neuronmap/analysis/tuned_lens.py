"""The tuned lens (Belrose et al. 2023, "Eliciting latent predictions with the tuned lens"): the logit lens with one
learned affine translator per layer, so that what a layer would predict is read in the last layer's basis.

Layer `l`'s residual stream `h` becomes `h + A_l h + b_l` before the model's own final norm and unembedding. `A_l`
and `b_l` start at zero, so an untrained `TunedLens` is the logit lens; `train_tuned_lens` fits them (Adam) to
minimise KL(final ‖ lens), the divergence from the model's own next-token distribution to the lens's, on texts run
through the model or on an activation store. The last layer's translator is the identity (it already is the output).

    lens = train_tuned_lens(model, texts, steps=250)
    tuned_lens(model, "When Mary and John went to the store", lens)    # a LogitLens grid labelled "tuned lens"
    lens_kl(model, held_out, lens)                                       # KL by layer, logit lens vs tuned lens
    lens.save("lens/"); TunedLens.load("lens/", model)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError, TunedLensError
from ..linechart import line_chart_figure, line_chart_svg
from .lenses import LogitLens, final_norm, read_lens

DEFAULT_HOOKS = "blocks.*.hook_resid_post"
WEIGHTS_FILE = "tuned_lens.safetensors"
CONFIG_FILE = "tuned_lens.json"
FORMAT = "neuronmap.tuned_lens"
FORMAT_VERSION = 1
_CONTEXT = 1024  # tokens per window for a model that states no context length (else its own, as nm.extract)
_TITLE = "mean KL(final ‖ lens) by layer (±1.96 SE)"


class TunedLens(Renders):
    """One affine translator per hook (`h ↦ h + h @ A.T + b`): `.hooks` (in model order), `.weight [hook, d_model,
    d_model]` (each `A`), `.bias [hook, d_model]`, the model it was made for (`.model_name`, `.d_model`,
    `.n_layers`) and `.training` (the settings and per-hook final KL, when trained).

    `lens(model, prompt)` is `tuned_lens(model, prompt, lens)`; `save(directory)` / `TunedLens.load(directory, model)`
    keep it as safetensors plus a JSON description.
    """

    def __init__(self, hooks: Sequence[str], weight: torch.Tensor, bias: torch.Tensor, *, model_name: str | None,
                 d_model: int, n_layers: int, training: dict | None = None):
        self.hooks = list(hooks)
        self.weight = weight
        self.bias = bias
        self.model_name = model_name
        self.d_model = d_model
        self.n_layers = n_layers
        self.training = training

    @classmethod
    def identity(cls, model: Any, hooks: str | Sequence[str] = DEFAULT_HOOKS) -> TunedLens:
        """An untrained tuned lens of `model` at `hooks` (every translator zero): exactly the logit lens."""
        names = _lens_hooks(model, hooks)
        d_model = _d_model(model)
        device = model.weights.W_U.device
        return cls(names, torch.zeros(len(names), d_model, d_model, device=device),
                   torch.zeros(len(names), d_model, device=device), model_name=model.name, d_model=d_model,
                   n_layers=len(model.weights.blocks))

    @property
    def layers(self) -> list[str]:
        """The lens's layer labels, one per hook: "embed" for `blocks.0.hook_resid_pre`, else the block index."""
        return [_layer_of(hook) for hook in self.hooks]

    def translate(self, hook: str, stream: torch.Tensor) -> torch.Tensor:
        """`stream [..., d_model]` at `hook` through its translator (in float32, returned in the stream's dtype);
        the last layer's stream, which has no translator, unchanged."""
        if hook not in self.hooks:
            if hook == _final_hook(self.n_layers):
                return stream
            raise InputError(f"this tuned lens has no translator for {hook!r} (it has: {', '.join(self.hooks)})")
        return _translated(stream, self.weight[self.hooks.index(hook)], self.bias[self.hooks.index(hook)])

    def to(self, device: str | torch.device) -> TunedLens:
        """Move the translators to `device` (in place, like `nn.Module.to`) and return the lens."""
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def __call__(self, model: Any, prompt: Any, **options: Any) -> LogitLens:
        return tuned_lens(model, prompt, self, **options)

    def check(self, model: Any) -> None:
        """A TunedLensError naming the mismatch unless `model` is the one this lens was made for (its name, width
        and depth) and has every hook the lens translates."""
        found = (model.name, _d_model(model), len(model.weights.blocks))
        wanted = (self.model_name, self.d_model, self.n_layers)
        if found != wanted:
            differences = [f"{what} {w!r}, not {f!r}"
                           for what, f, w in zip(("model", "d_model", "layers"), found, wanted) if f != w]
            raise TunedLensError(f"this tuned lens was made for another model: {'; '.join(differences)}")
        missing = [hook for hook in self.hooks if hook not in model.hook_names]
        if missing:
            raise TunedLensError(f"the model has no hook points {', '.join(missing)}, which this tuned lens translates")

    def save(self, directory: str | os.PathLike) -> None:
        """Write the translators to `directory/tuned_lens.safetensors` and the description (model name, hooks,
        d_model, training, the weights' SHA-256) to `directory/tuned_lens.json`, each written whole to a temporary
        name and then moved into place."""
        from safetensors.torch import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        save_file({"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()},
                  f"{weights}.partial")
        description = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_name": self.model_name,
                       "hooks": self.hooks, "d_model": self.d_model, "n_layers": self.n_layers,
                       "weights_sha256": _sha256(Path(f"{weights}.partial")), "training": self.training}
        Path(f"{config}.partial").write_text(json.dumps(description, indent=2), encoding="utf-8")
        os.replace(f"{weights}.partial", weights)
        os.replace(f"{config}.partial", config)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any = None) -> TunedLens:
        """The tuned lens `save` wrote to `directory`; with `model`, checked to be made for it (`check`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(directory)
        weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        for path in (weights, config):
            if not path.is_file():
                raise TunedLensError(f"{str(folder)!r} holds no tuned lens: {path.name} is missing")
        try:
            description = json.loads(config.read_text(encoding="utf-8"))
            tensors = load_file(weights)
        except (ValueError, SafetensorError) as error:
            raise TunedLensError(f"{str(folder)!r} is not a readable tuned lens: {error}") from error
        if not isinstance(description, dict) or description.get("format") != FORMAT:
            raise TunedLensError(f"{config} is not a tuned lens description (no format {FORMAT!r})")
        if description.get("weights_sha256") != _sha256(weights):
            raise TunedLensError(f"{weights} is not the file {config.name} describes (its SHA-256 differs)")
        hooks, d_model = description["hooks"], description["d_model"]
        shapes = {"weight": (len(hooks), d_model, d_model), "bias": (len(hooks), d_model)}
        found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        if found != shapes:
            raise TunedLensError(f"{weights} holds {found}, not the translators {config.name} describes ({shapes})")
        lens = cls(hooks, tensors["weight"], tensors["bias"], model_name=description["model_name"], d_model=d_model,
                   n_layers=description["n_layers"], training=description.get("training"))
        if model is not None:
            lens.check(model)
            lens.to(model.weights.W_U.device)
        return lens

    def __repr__(self) -> str:
        state = "trained" if self.training else "untrained"
        return (f"TunedLens({state}, {len(self.hooks)} translators of d_model {self.d_model}, layers "
                f"{', '.join(self.layers)}, for {self.model_name!r})")

    def _repr_html_(self) -> str:
        kl = (self.training or {}).get("final_kl", {})
        rows = [(hook, layer, f"{float(w.norm()):.4g}", f"{float(b.norm()):.4g}", _number(kl.get(hook)))
                for hook, layer, w, b in zip(self.hooks, self.layers, self.weight, self.bias)]
        headers = ["hook", "layer", "‖A‖_F", "‖b‖", "KL at the last step"]
        return html_table(repr(self), headers, rows, numeric=(2, 3, 4))


def train_tuned_lens(
    model: Any,
    data: Any,
    *,
    hooks: str | Sequence[str] = DEFAULT_HOOKS,
    steps: int = 250,
    lr: float = 3e-3,
    batch_size: int = 512,
    context_length: int | None = None,
    model_batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Fit a translator for each of `hooks` (glob patterns or names of `blocks.L.hook_resid_post`, or
    `blocks.0.hook_resid_pre` for the embeddings; the last layer is left out: its translator is the identity).

    `data`: texts (a list of strings, token ids: anything `nm.extract` reads), run through the model once in
    `model_batch_size` windows of `context_length` tokens (default: the model's context, as `nm.extract`), their
    residual streams held in memory (tokens × (hooks + 1) × d_model floats); or an `ActivationStore` (or the path of
    an .h5 store) holding `hooks` and the last layer's `hook_resid_post`, read block by block. The target is the
    model's own next-token distribution: the last layer's residual stream through the final norm and unembedding, no
    gradient reaching the model.

    Each of `steps` Adam steps at `lr` (decayed linearly to 0) reads `batch_size` consecutive tokens, the blocks
    visited in an order shuffled from `seed` (again for each pass), and lowers the mean over hooks of the mean over
    tokens of KL(final ‖ translated lens). The same seed and data give the same lens bit for bit on a CPU. A
    non-finite loss stops with a TunedLensError naming the step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("model_batch_size", model_batch_size)):
        _positive(name, value)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    lens = TunedLens.identity(model, hooks)
    rows = _rows(model, data, lens.hooks, context_length, model_batch_size)
    unembed = _Unembed(model)
    weight = lens.weight.clone().requires_grad_(True)
    bias = lens.bias.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    blocks = _Blocks(rows.count, batch_size, seed)
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="tuned lens", disable=not progress, leave=False)
    kls = torch.zeros(len(lens.hooks))
    for step in bar:
        streams, last = rows.read(*blocks.next())
        with torch.no_grad():
            target = unembed(last.to(weight.device))
        kls = torch.stack([_kl(target, unembed(_translated(stream.to(weight.device), weight[i], bias[i]))).mean()
                           for i, stream in enumerate(streams)])
        loss = kls.mean()
        if not torch.isfinite(loss):
            raise TunedLensError(f"the tuned lens's loss is {float(loss.detach())} at step {step}: lower lr (now {lr})",
                                 step)
        weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])  # gradients for the translators only
        optimiser.step()
        schedule.step()
        if progress:
            bar.set_postfix(kl=f"{loss.item():.4f}")
    lens.weight, lens.bias = weight.detach(), bias.detach()
    lens.training = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "tokens": rows.count,
                     "data": rows.description, "optimizer": "Adam, linear decay to 0",
                     "final_kl": dict(zip(lens.hooks, (float(k) for k in kls.detach())))}
    return lens


def tuned_lens(model: Any, prompt: Any, lens: TunedLens, *, positions: int | slice | Sequence[int] | str | None = None,
               top_k: int = 5) -> LogitLens:
    """The tuned lens of one prompt: `logit_lens`'s layer × position view of the top tokens (a `LogitLens` whose
    `.method` is "tuned lens"), each layer's residual stream first through its translator. Its layers are the
    lens's, then the last layer (the model's own output)."""
    if not isinstance(lens, TunedLens):
        raise InputError(f"lens must be a TunedLens (from train_tuned_lens or TunedLens.load), not "
                         f"{type(lens).__name__}")
    lens.check(model)
    lens.to(model.weights.W_U.device)
    last = len(model.weights.blocks) - 1
    layers = [("embed" if label == "embed" else int(label)) for label in lens.layers] + [last]
    return read_lens(model, prompt, layers, positions, top_k, translate=lens.translate, method="tuned lens")


def lens_kl(model: Any, data: Any, lens: TunedLens | None = None, *, hooks: str | Sequence[str] | None = None,
            context_length: int | None = None, model_batch_size: int = 16, batch_size: int = 4096) -> LensKL:
    """Mean KL(final ‖ lens) in nats per layer, over every token of `data` (texts or a store, as
    `train_tuned_lens` reads them), for the logit lens and, with `lens`, the tuned lens beside it; each mean with its
    standard error over tokens (sample standard deviation / √tokens). `hooks`: the layers (default: the lens's, or
    every block's `hook_resid_post` but the last's)."""
    if lens is not None:
        if not isinstance(lens, TunedLens):
            raise InputError(f"lens must be a TunedLens or None, not {type(lens).__name__}")
        lens.check(model)
        lens.to(model.weights.W_U.device)
    names = _lens_hooks(model, hooks if hooks is not None else (lens.hooks if lens is not None else DEFAULT_HOOKS))
    _positive("batch_size", batch_size)
    rows = _rows(model, data, names, context_length, model_batch_size)
    unembed = _Unembed(model)
    methods = {"logit lens": lambda hook, stream: stream}
    if lens is not None:
        methods["tuned lens"] = lens.translate
    sums = torch.zeros(len(methods), len(names), dtype=torch.float64)
    squares = torch.zeros_like(sums)
    with torch.no_grad():
        for start in range(0, rows.count, batch_size):
            streams, last = rows.read(start, min(start + batch_size, rows.count))
            target = unembed(last.to(unembed.device))
            for m, translate in enumerate(methods.values()):
                for i, (name, stream) in enumerate(zip(names, streams)):
                    kl = _kl(target, unembed(translate(name, stream.to(unembed.device)))).double()
                    sums[m, i] += kl.sum().cpu()
                    squares[m, i] += kl.square().sum().cpu()
    n = rows.count
    mean = sums / n
    variance = (squares - n * mean.square()).clamp(min=0) / max(n - 1, 1)
    return LensKL([_layer_of(name) for name in names], names, list(methods), mean.numpy(),
                  (variance / n).sqrt().numpy(), n)


class LensKL(Renders):
    """KL(final ‖ lens) per layer: `.mean [method, layer]` and `.se [method, layer]` (standard errors over the
    `.tokens` tokens) for `.methods` ("logit lens", and "tuned lens" when a lens was given) at `.layers` (labels)
    / `.hooks`. Renders as a line chart by layer with ±1.96 SE bands; `.figure()` is the plotly chart."""

    def __init__(self, layers: list[str], hooks: list[str], methods: list[str], mean: np.ndarray, se: np.ndarray,
                 tokens: int):
        self.layers = layers
        self.hooks = hooks
        self.methods = methods
        self.mean = mean
        self.se = se
        self.tokens = tokens

    def __repr__(self) -> str:
        means = "; ".join(f"{m} {' '.join(f'{v:.3g}' for v in row)}" for m, row in zip(self.methods, self.mean))
        return (f"LensKL({len(self.layers)} layers over {self.tokens:,} tokens, mean KL(final ‖ lens) in nats: "
                f"{means})")

    def to_numpy(self) -> np.ndarray:
        """The means `[method, layer]`."""
        return self.mean

    def figure(self) -> Any:
        """The plotly line chart of mean KL by layer, one line per lens, shaded ±1.96 standard errors."""
        series, bands = self._chart()
        return line_chart_figure(self.layers, series, bands=bands, title=_TITLE, x_label="layer", y_label="KL (nats)")

    def _chart(self) -> tuple[dict, dict]:
        series = {m: row.tolist() for m, row in zip(self.methods, self.mean)}
        bands = {m: ((row - 1.96 * se).tolist(), (row + 1.96 * se).tolist())
                 for m, row, se in zip(self.methods, self.mean, self.se)}
        return series, bands

    def _repr_html_(self) -> str:
        series, bands = self._chart()
        chart = line_chart_svg(self.layers, series, bands=bands, title=_TITLE,
                               x_label="layer", y_label="KL (nats)")
        headers = ["layer", "hook", *(f"{m} KL ± SE" for m in self.methods)]
        rows = [(layer, hook, *(f"{self.mean[m, i]:.4g} ± {self.se[m, i]:.2g}" for m in range(len(self.methods))))
                for i, (layer, hook) in enumerate(zip(self.layers, self.hooks))]
        numeric = tuple(range(2, 2 + len(self.methods)))
        table = html_table(f"over {self.tokens:,} tokens", headers, rows, numeric=numeric)
        return f'<div class="nm-lens-kl"><div>{escape(repr(self))}</div>{chart}{table}</div>'


# --- the translator and the model's own read-out ---------------------------------------------------------------------


def _translated(stream: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    h = stream.to(weight.dtype)
    return (h + h @ weight.T + bias).to(stream.dtype)


class _Unembed:
    """The model's final norm and unembedding as log-probabilities `[tokens, vocab]` (float32) of residual streams
    `[tokens, d_model]`: what the model itself outputs from its last layer's stream."""

    def __init__(self, model: Any):
        self.norm = final_norm(model)
        self.W_U, self.b_U = model.weights.W_U, model.weights.b_U
        self.device = self.W_U.device

    def __call__(self, stream: torch.Tensor) -> torch.Tensor:
        return (self.norm(stream).to(self.W_U.dtype) @ self.W_U + self.b_U).float().log_softmax(-1)


def _kl(target: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ lens) per token, both given as log-probabilities `[tokens, vocab]`."""
    return torch.nn.functional.kl_div(logprobs, target, log_target=True, reduction="none").sum(-1)


# --- hooks -----------------------------------------------------------------------------------------------------------


def _lens_hooks(model: Any, hooks: str | Sequence[str]) -> list[str]:
    """`hooks` resolved on `model` (a HookNameError for unknown names), the last layer left out; each must be a
    block's `hook_resid_post` or the embeddings' `blocks.0.hook_resid_pre`."""
    final_norm(model)  # a WeightError where the model has no final norm or unembedding
    names = model.resolve(hooks)
    final = _final_hook(len(model.weights.blocks))
    for name in names:
        if name != "blocks.0.hook_resid_pre" and not (name.startswith("blocks.") and name.endswith(".hook_resid_post")):
            raise InputError(f"a tuned lens translates the residual stream after a block (blocks.L.hook_resid_post) or "
                             f"the embeddings (blocks.0.hook_resid_pre), not {name!r}")
    names = [name for name in names if name != final]
    if not names:
        raise InputError(f"no layer to translate: {hooks!r} names only the last layer, whose translator is the "
                         "identity")
    return names


def _layer_of(hook: str) -> str:
    return "embed" if hook == "blocks.0.hook_resid_pre" else hook.split(".")[1]


def _final_hook(n_layers: int) -> str:
    return f"blocks.{n_layers - 1}.hook_resid_post"


def _d_model(model: Any) -> int:
    return int(model.weights.W_U.shape[0])


# --- the data: aligned residual rows, one per token ------------------------------------------------------------------


@dataclass
class _Rows:
    """`count` tokens' residual streams at the lens's hooks and at the last layer: `read(start, stop)` gives
    (`[stop - start, d_model]` per hook, the last layer's)."""

    count: int
    read: Callable[[int, int], tuple[list[torch.Tensor], torch.Tensor]]
    description: dict


def _rows(model: Any, data: Any, hooks: list[str], context_length: int | None, model_batch_size: int) -> _Rows:
    from ..store.reader import ActivationStore

    final = _final_hook(len(model.weights.blocks))
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix in (".h5", ".hdf5") and Path(data).is_file():
        data = ActivationStore(data)
    if isinstance(data, ActivationStore):
        return _store_rows(data, hooks, final, _d_model(model))
    return _model_rows(model, data, hooks, final, context_length, model_batch_size)


def _store_rows(store: Any, hooks: list[str], final: str, d_model: int) -> _Rows:
    missing = [hook for hook in (*hooks, final) if hook not in store.hooks]
    if missing:
        raise InputError(f"the store lacks {', '.join(missing)}: a tuned lens needs the hooks it translates and the "
                         f"last layer's {final} (the store holds {', '.join(store.hooks)})")
    for hook in (*hooks, final):
        if tuple(store[hook].shape[1:]) != (d_model,):
            raise InputError(f"the store's {hook} rows have shape {list(store[hook].shape[1:])}, not the model's "
                             f"[{d_model}]: was the store extracted from another model?")
    if len(store) == 0:
        raise InputError("the store holds no rows")
    views = [store[hook] for hook in hooks]
    last = store[final]

    def read(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [v.to_torch(v.read(start, stop)).float() for v in views], last.to_torch(last.read(start, stop)).float()

    return _Rows(len(store), read, {"source": "store", "path": str(store.path), "rows": len(store)})


def _model_rows(model: Any, inputs: Any, hooks: list[str], final: str, context_length: int | None,
                model_batch_size: int) -> _Rows:
    from ..inputs import pad_id
    from ..store.sources import token_batches

    limit = model.context_length
    context = context_length if context_length is not None else limit or _CONTEXT
    _positive("context_length", context)
    names = [*hooks, final]
    parts: list[list[torch.Tensor]] = [[] for _ in names]
    for batch in token_batches(inputs, model.tokenizer, pad_id(model.tokenizer), context, model_batch_size):
        trace = model.run(batch.tokens, attention_mask=batch.mask, capture=names, stop_early=True)
        for part, name in zip(parts, names):
            activation = trace[name]
            part.append(activation[batch.mask.bool().to(activation.device)].detach().float().cpu())
    if not parts[0]:
        raise InputError("the texts hold no tokens")
    columns = [torch.cat(part) for part in parts]
    bad = [name for name, column in zip(names, columns) if not torch.isfinite(column).all()]
    if bad:
        raise InputError(f"the model's residual stream holds NaN or infinite values at {', '.join(bad)}")

    def read(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [column[start:stop] for column in columns[:-1]], columns[-1][start:stop]

    return _Rows(len(columns[0]), read, {"source": "texts", "context_length": context, "tokens": len(columns[0])})


class _Blocks:
    """Consecutive blocks of `batch_size` rows, visited in an order shuffled from `seed` on each pass."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.starts = list(range(0, count, batch_size))
        self.count, self.batch_size = count, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> tuple[int, int]:
        if not self.order:
            self.order = torch.randperm(len(self.starts), generator=self.generator).tolist()
        start = self.starts[self.order.pop()]
        return start, min(start + self.batch_size, self.count)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
