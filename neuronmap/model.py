"""Model: an unmodified HF model (or any module) with named hook points to capture and intervene on."""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

from .architectures import adapter_for
from .errors import HookNameError, InputError, InterventionError, LoadError
from .hooks import Action, HookPoint, attached
from .inputs import Batch, Inputs, to_batch
from .trace import Trace

Names = Union[str, Iterable[str]]
Intervention = Union[Callable[[torch.Tensor, HookPoint], Union[torch.Tensor, None]], torch.Tensor]
Positions = Union[int, slice, list, torch.Tensor, str, None]


def load(model: Any, tokenizer: Any = None, *, name: str | None = None, **kwargs: Any) -> Model:
    """Wrap a model for capture and intervention.

    `model` is a hub id or local directory (loaded with `from_pretrained`; `kwargs` go to it, e.g.
    `attn_implementation="eager"` or `dtype=torch.float16`), a `transformers.PreTrainedModel`, or any
    `torch.nn.Module`. `name` is what reprs and views call the model (default: the hub id, the directory's
    name, or the class name). The model is put in eval mode, as `from_pretrained` leaves it, and is never
    otherwise modified.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = _from_pretrained(os.fspath(model), **kwargs)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif kwargs:
        raise LoadError(f"keyword arguments {sorted(kwargs)} only apply when loading from a hub id or directory")
    if not isinstance(model, nn.Module):
        raise LoadError(f"cannot load a {type(model).__name__}: give a hub id, a directory, or a torch.nn.Module")
    return Model(model.eval(), tokenizer, name=name)


class Model:
    """A model with TransformerLens-named hook points on its real modules (module paths for non-HF modules).

    `run` does one forward pass and returns a `Trace`; `hooks` keeps interventions attached over a block.
    """

    def __init__(self, module: nn.Module, tokenizer: Any = None, name: str | None = None):
        self.module = module
        self.tokenizer = tokenizer
        self.name = name or _default_name(module)
        self.architecture, adapter = adapter_for(module)
        self._points: dict[str, HookPoint] = {p.name: p for p in adapter(module)}
        self._attached: list[str] = []
        config = getattr(module, "config", None)
        self._config = config
        self._max_length = _context_length(config)
        # One analysis pass never needs the KV cache: building it costs memory and the trace would keep it.
        accepts_cache = "use_cache" in inspect.signature(module.forward).parameters
        self._forward_kwargs = {"use_cache": False} if accepts_cache else {}

    @property
    def hook_names(self) -> list[str]:
        """Every hook point, in the order the forward pass reaches them."""
        return list(self._points)

    @property
    def device(self) -> torch.device:
        parameter = next(self.module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.module.parameters())
        attention = getattr(self._config, "_attn_implementation", None)
        extra = f", {attention} attention" if attention else ""
        return (
            f"Model({self.name!r}, {type(self.module).__name__}, {self.architecture} adapter, "
            f"{n_params / 1e6:.1f}M parameters, {len(self._points)} hook points{extra})"
        )

    def resolve(self, names: Names) -> list[str]:
        """Hook names matching `names`: exact names or glob patterns (`"blocks.*.hook_resid_post"`), model order."""
        wanted = [names] if isinstance(names, str) else list(names)
        found: set[str] = set()
        for name in wanted:
            if not isinstance(name, str):
                raise HookNameError(repr(name), self._points)
            if any(ch in name for ch in "*?["):
                matches = fnmatch.filter(self._points, name)
                if not matches:
                    raise HookNameError(name, self._points, pattern=True)
                found.update(matches)
            elif name in self._points:
                found.add(name)
            else:
                raise HookNameError(name, self._points)
        return [name for name in self._points if name in found]

    def run(
        self,
        inputs: Inputs,
        *,
        capture: Names | None = None,
        interventions: Mapping[str, Intervention] | None = None,
        attention_mask: torch.Tensor | None = None,
        capture_device: str | torch.device | None = None,
        capture_dtype: torch.dtype | None = None,
        capture_positions: Positions = None,
        grad: bool = False,
    ) -> Trace:
        """Run one forward pass and return its `Trace`.

        `inputs`: a string, a list of strings (padded; the attention mask is respected) or token ids.
        `capture`: hook names or glob patterns whose activations the trace keeps (after interventions).
        `interventions`: hook name or pattern -> `fn(activation, hook)` returning the replacement (or editing
        the activation in place and returning None), or a tensor that replaces the activation.
        `capture_device`/`capture_dtype` move and cast what is kept; `capture_positions` keeps only some token
        positions (an int, a slice, a list, or `"last"` for each prompt's last real token), keeping the
        position dimension. `grad=True` runs with autograd on (for gradients through interventions).
        """
        if self._config is None and isinstance(inputs, torch.Tensor):
            batch = Batch(inputs, None)  # any nn.Module: its input goes through unchanged
        else:
            batch = to_batch(inputs, self.tokenizer, attention_mask, self._max_length)
        recorder = _Recorder(batch, capture_device, capture_dtype, capture_positions)
        actions = self._actions(self.resolve(capture) if capture is not None else [], interventions or {}, recorder)
        batch = batch.to(self.device)
        with self._attach(actions), torch.set_grad_enabled(grad):
            output = self._forward(batch)
        return Trace(output, batch, recorder.activations, self.tokenizer, self.name)

    @contextlib.contextmanager
    def hooks(self, interventions: Mapping[str, Intervention]) -> Iterator[Model]:
        """Keep `interventions` attached for every forward pass in the block (`run` or the module itself)."""
        with self._attach(self._actions([], interventions, None)):
            yield self

    def list_hooks(self) -> list[str]:
        """The hook points NeuronMap has attached right now (empty between runs)."""
        return list(self._attached)

    def _actions(self, capture: list[str], interventions: Mapping[str, Intervention], recorder) -> dict:
        per_point: dict[str, list[Intervention]] = {}
        for pattern, value in interventions.items():
            if not (callable(value) or isinstance(value, torch.Tensor)):
                raise InterventionError(
                    f"intervention on {pattern!r} must be a function fn(activation, hook) or a tensor, "
                    f"not {type(value).__name__}"
                )
            for name in self.resolve(pattern):
                per_point.setdefault(name, []).append(value)
        names = [name for name in self._points if name in per_point or name in capture]
        return {
            self._points[name]: _PointAction(
                self._points[name], per_point.get(name, []), recorder if name in capture else None
            )
            for name in names
        }

    @contextlib.contextmanager
    def _attach(self, actions: dict[HookPoint, Action]) -> Iterator[None]:
        names = [point.name for point in actions]
        self._attached.extend(names)
        try:
            with attached(actions, self._config):
                yield
        finally:
            for name in names:
                self._attached.remove(name)

    def _forward(self, batch: Batch) -> Any:
        if self._config is None:
            return self.module(batch.tokens)
        return self.module(input_ids=batch.tokens, attention_mask=batch.attention_mask, **self._forward_kwargs)


class _PointAction:
    """What happens at one hook point in one run: interventions in order, then capture of the result."""

    def __init__(self, point: HookPoint, interventions: list[Intervention], recorder: _Recorder | None):
        self.point = point
        self.interventions = interventions
        self.recorder = recorder

    def __call__(self, activation: torch.Tensor) -> torch.Tensor | None:
        original = activation
        for value in self.interventions:
            activation = self._apply(value, activation)
        if self.recorder is not None:
            self.recorder.record(self.point, activation)
        return None if activation is original else activation

    def _apply(self, value: Intervention, activation: torch.Tensor) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            replacement = value
        else:
            given = activation.clone()  # in-place edits must not reach tensors the model aliases elsewhere
            replacement = value(given, self.point)
            replacement = given if replacement is None else replacement
        if not isinstance(replacement, torch.Tensor):
            raise InterventionError(
                f"intervention on {self.point.name!r} returned {type(replacement).__name__}, expected a tensor or None"
            )
        if replacement.shape != activation.shape:
            try:
                replacement = replacement.expand_as(activation)
            except RuntimeError:
                raise InterventionError(
                    f"intervention on {self.point.name!r} gave shape {list(replacement.shape)}, "
                    f"expected {list(activation.shape)}"
                ) from None
        return replacement.to(device=activation.device, dtype=activation.dtype)


class _Recorder:
    """Keeps captured activations, moved, cast and cut to the requested positions, without extra copies."""

    def __init__(self, batch: Batch, device, dtype: torch.dtype | None, positions: Positions):
        self.activations: dict[str, torch.Tensor] = {}
        self.device = device
        self.dtype = dtype
        self.positions = positions
        if isinstance(positions, str) and positions != "last":
            raise InputError(f"capture_positions {positions!r} is not valid; did you mean 'last'?")
        if positions == "last" and batch.attention_mask is None:
            raise InputError("capture_positions='last' needs token inputs with an attention mask; use -1")
        self.last = batch.last_positions if positions == "last" else None

    def record(self, point: HookPoint, activation: torch.Tensor) -> None:
        kept = _select_positions(activation.detach(), point.pos_dim, self.positions, self.last)
        kept = kept.to(device=self.device or kept.device, dtype=self.dtype or kept.dtype)
        if kept.untyped_storage().nbytes() > kept.numel() * kept.element_size():
            kept = kept.clone()  # a view would keep its whole base tensor alive
        self.activations[point.name] = kept


def _select_positions(tensor: torch.Tensor, dim: int, positions: Positions, last: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        return tensor
    if isinstance(positions, str):
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        return tensor.movedim(dim, 1)[rows, last.to(tensor.device)].unsqueeze(1).movedim(1, dim)
    if isinstance(positions, int):
        positions = slice(positions, positions + 1 if positions != -1 else None)
    if isinstance(positions, slice):
        return tensor[(slice(None),) * dim + (positions,)]
    index = torch.as_tensor(positions, dtype=torch.long, device=tensor.device)
    return tensor.index_select(dim, index % tensor.shape[dim])


def _from_pretrained(path: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model = (model_class or transformers.AutoModel).from_pretrained(path, **kwargs)
    except OSError as error:
        raise LoadError(f"could not load {path!r} with from_pretrained: {error}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _default_name(module: nn.Module) -> str:
    """The hub id, or a local directory's own name (a full local path would leak into shared notebooks)."""
    path = getattr(getattr(module, "config", None), "name_or_path", None)
    if not path:
        return type(module).__name__
    return os.path.basename(os.path.normpath(path)) if os.path.isabs(path) else path


def _context_length(config: Any) -> int | None:
    for attribute in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            if getattr(config, "model_type", None) == "roberta":
                return value - config.pad_token_id - 1  # RoBERTa's positions start after the padding index
            return value
    return None

