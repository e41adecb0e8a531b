"""Model: an unmodified HF model (or any module) with named hook points to capture and intervene on."""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

from .architectures import adapter_for
from .capture import AllRecorded, Positions, PositionSelection, Recorder
from .errors import HookNameError, InputError, InterventionError, LoadError, NeuronMapError
from .hooks import Action, HookPoint, attached
from .inputs import Batch, Inputs, to_batch, token_strings
from .loading import from_pretrained
from .trace import Trace
from .weights import Weights

Names = Union[str, Iterable[str]]
Intervention = Union[Callable[[torch.Tensor, HookPoint], Union[torch.Tensor, None]], torch.Tensor]
Saes = Union[Any, Iterable[Any], Mapping[str, Any]]
"""Sparse autoencoders to splice in: one, a list (each at its `cfg.hook_name`), or hook name -> SAE."""


def _tl_weight(name: str) -> property:
    """A property reading `model.weights.<name>`, so `model.W_Q` works as on a TransformerLens model."""
    return property(lambda self: getattr(self.weights, name), doc=f"`weights.{name}`, TransformerLens-shaped.")


def load(model: Any, tokenizer: Any = None, *, name: str | None = None, **kwargs: Any) -> Model:
    """Wrap a model for capture and intervention.

    `model` is a zoo name (`neuronmap.zoo.list()`), a local directory or a hub id (loaded with `from_pretrained`;
    `kwargs` go to it, e.g. `attn_implementation="eager"`, `dtype=torch.float16` or `local_files_only=True`, and
    the hub options among them to the config and tokenizer too), a `transformers.PreTrainedModel`, or any
    `torch.nn.Module`. `name` is what reprs and views call the model (default: the zoo name, the hub id, the
    directory's name, or the class name). The model is put in eval mode, as `from_pretrained` leaves it, and is
    never otherwise modified.
    """
    if isinstance(model, Model):
        return model
    problem = None
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer, problem, zoo_name = from_pretrained(model, with_tokenizer=tokenizer is None, **kwargs)
        name = name or zoo_name
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif kwargs:
        raise LoadError(f"keyword arguments {sorted(kwargs)} only apply when loading from a zoo name, hub id or directory")
    if not isinstance(model, nn.Module):
        raise LoadError(f"cannot load a {type(model).__name__}: give a zoo name, hub id, directory, or a torch.nn.Module")
    return Model(model.eval(), tokenizer, name=name, tokenizer_problem=problem)


class Model:
    """A model with TransformerLens-named hook points on its real modules (module paths for non-HF modules).

    `run` does one forward pass and returns a `Trace`; `hooks` keeps interventions attached over a block;
    `generate` continues text with interventions attached at every step.
    """

    def __init__(self, module: nn.Module, tokenizer: Any = None, name: str | None = None, tokenizer_problem: str | None = None):
        self.module = module
        self.tokenizer = tokenizer
        self.name = name or _default_name(module)
        self.architecture, adapter = adapter_for(module)
        self._points: dict[str, HookPoint] = {p.name: p for p in adapter(module)}
        self._attached: list[str] = []
        self._splices: dict[str, _Splice] = {}
        config = getattr(module, "config", None)
        self._config = config
        self._max_length = _context_length(config)
        self._tokenizer_problem = tokenizer_problem
        # One analysis pass never needs the KV cache: building it costs memory and the trace would keep it.
        accepts_cache = "use_cache" in inspect.signature(module.forward).parameters
        self._forward_kwargs = {"use_cache": False} if accepts_cache else {}

    @functools.cached_property
    def weights(self) -> Weights:
        """The weights shaped as in TransformerLens, read from the HF modules (`weights.blocks[L].attn.W_Q`)."""
        return Weights(self.module)

    W_E = _tl_weight("W_E")
    W_U = _tl_weight("W_U")
    b_U = _tl_weight("b_U")
    W_pos = _tl_weight("W_pos")
    W_Q = _tl_weight("W_Q")
    W_K = _tl_weight("W_K")
    W_V = _tl_weight("W_V")
    W_O = _tl_weight("W_O")
    b_Q = _tl_weight("b_Q")
    b_K = _tl_weight("b_K")
    b_V = _tl_weight("b_V")
    b_O = _tl_weight("b_O")
    W_in = _tl_weight("W_in")
    W_gate = _tl_weight("W_gate")
    W_out = _tl_weight("W_out")
    b_in = _tl_weight("b_in")
    b_out = _tl_weight("b_out")

    @property
    def hook_names(self) -> list[str]:
        """Every hook point, in the order the forward pass reaches them."""
        return list(self._points)

    @property
    def device(self) -> torch.device:
        parameter = next(self.module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @property
    def context_length(self) -> int | None:
        """The most tokens one input may have (None when the model does not say)."""
        return self._max_length

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
        capture_grad: Names | None = None,
        stop_early: bool = False,
        saes: Saes | None = None,
        use_error_term: bool = False,
    ) -> Trace:
        """Run one forward pass and return its `Trace`.

        `inputs`: a string, a list of strings (padded; the attention mask is respected) or token ids.
        `capture`: hook names or glob patterns whose activations the trace keeps (after interventions).
        `interventions`: hook name or pattern -> `fn(activation, hook)` returning the replacement (or editing
        the activation in place and returning None), or a tensor that replaces the activation.
        `capture_device`/`capture_dtype` move and cast what is kept; `capture_positions` keeps only some token
        positions of the (padded) inputs (an int, a slice, a list or tensor of positions, or `"last"` for each
        prompt's last real token), keeping the position dimension; a position outside the inputs is an error.
        `grad=True` runs with autograd on, and captures stay in the graph. `capture_grad` names hook points
        whose gradients a later `.backward()` records: `trace.grad(name)` (implies `grad=True`).
        `stop_early=True` ends the forward pass as soon as everything in `capture` is recorded, skipping the
        layers and unembedding after it (as TransformerLens's `stop_at_layer`); the trace then has no output.
        `saes` splices sparse autoencoders in for this run, as `spliced` does (`use_error_term` likewise).
        """
        if saes is not None:
            with self.spliced(saes, use_error_term=use_error_term):
                return self.run(
                    inputs, capture=capture, interventions=interventions, attention_mask=attention_mask,
                    capture_device=capture_device, capture_dtype=capture_dtype, capture_positions=capture_positions,
                    grad=grad, capture_grad=capture_grad, stop_early=stop_early,
                )
        batch = self._batch(inputs, attention_mask)
        length = batch.tokens.shape[1] if self._config is not None else None
        grad_names = frozenset(self.resolve(capture_grad)) if capture_grad is not None else frozenset()
        grad = grad or bool(grad_names)
        selection = PositionSelection(capture_positions, batch, length)
        recorder = Recorder(selection, capture_device, capture_dtype, keep_graph=grad, grad_names=grad_names)
        capture_names = self.resolve(capture) if capture is not None else []
        if stop_early and not capture_names:
            raise InputError("stop_early=True needs something to capture: the run would stop before it starts")
        recorder.stop_when_recorded = frozenset(capture_names) if stop_early else None
        actions = self._actions(capture_names, interventions or {}, recorder)
        batch = batch.to(self.device)
        output = None
        with self._attach(actions), torch.set_grad_enabled(grad):
            try:
                output = self._forward(batch)
            except AllRecorded:
                pass
        return Trace(output, batch, recorder, self.tokenizer, self.name, self.hook_names)

    @contextlib.contextmanager
    def hooks(self, interventions: Mapping[str, Intervention]) -> Iterator[Model]:
        """Keep `interventions` attached for every forward pass in the block (`run`, `generate` or the module itself)."""
        with self._attach(self._actions([], interventions, None)):
            yield self

    @contextlib.contextmanager
    def spliced(self, *saes: Saes, use_error_term: bool = False) -> Iterator[Model]:
        """Within the block, each SAE replaces the activation at its hook point by its reconstruction in every
        forward pass (`run`, `generate`, the module itself).

        `saes`: SAEs (each at its `cfg.hook_name`), lists of them, or mappings hook name -> SAE. With
        `use_error_term=True` the hook passes on reconstruction + error, so the model's output is unchanged (bit for
        bit) until something edits the latents. Each SAE's insides become hook points `<hook>.hook_sae_input`,
        `.hook_sae_acts_pre`, `.hook_sae_acts_post`, `.hook_sae_recons`, `.hook_sae_error`, `.hook_sae_output`,
        which capture and interventions reach by name (feature ablation and steering are interventions on
        `.hook_sae_acts_post`). Interventions on the hook itself change what the SAE reads; its capture is what the
        SAE passes on.
        """
        wanted = _splice_targets(saes)
        for hook, sae in wanted.items():
            if hook not in self._points or "hook_sae_" in hook:
                raise HookNameError(hook, [n for n in self._points if "hook_sae_" not in n])
            if hook in self._splices:
                raise InputError(f"an SAE is already spliced at {hook!r}; leave that block first")
        shared = [sae for sae in wanted.values() if any(s.sae is sae for s in self._splices.values())]
        if shared or len({id(s) for s in wanted.values()}) < len(wanted):
            raise InputError("one SAE object cannot sit at two hook points at once (its hook points would clash); copy it")
        splices = {hook: _Splice(sae, use_error_term) for hook, sae in wanted.items()}
        before = self._points
        points: dict[str, HookPoint] = {}
        for name, point in before.items():
            points[name] = point
            if name in splices:
                points.update((p.name, p) for p in splices[name].sae.hook_points(name, point.pos_dim))
        self._points = points
        self._splices.update(splices)
        try:
            yield self
        finally:
            for hook in splices:
                del self._splices[hook]
            self._points = {name: point for name, point in self._points.items() if not _inside(name, splices)}

    def list_hooks(self) -> list[str]:
        """The hook points NeuronMap has attached right now (empty between runs)."""
        return list(self._attached)

    def generate(
        self,
        inputs: Inputs,
        max_new_tokens: int = 20,
        *,
        interventions: Mapping[str, Intervention] | None = None,
        do_sample: bool = False,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> str | list[str] | torch.Tensor:
        """Continue `inputs` with the model's own `generate` (KV cache on), `interventions` applied at every step.

        With the cache, each step after the first runs only the new token, so an intervention function sees
        `[batch, 1, ...]` activations there (attention patterns `[batch, head, 1, key]`). Greedy by default;
        `kwargs` go to `transformers`' `generate`. Returns text for text (prompt and continuation without special
        tokens, like TransformerLens) and token ids `[batch, pos + new]` for token ids. A list of strings is
        left-padded, so every prompt continues from its own last token.
        """
        if self._config is None or not callable(getattr(self.module, "generate", None)):
            raise InputError(f"generate needs a Hugging Face model with a language-model head, not a {type(self.module).__name__}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        batch = self._batch(inputs, attention_mask, padding_side="left")
        total = batch.tokens.shape[1] + max_new_tokens
        if self._max_length is not None and total > self._max_length:
            raise InputError(
                f"{batch.tokens.shape[1]} input tokens + {max_new_tokens} new ones exceed the model's context of "
                f"{self._max_length} tokens"
            )
        device_batch = batch.to(self.device)
        with self._attach(self._actions([], interventions or {}, None)), torch.no_grad():
            tokens = self.module.generate(
                input_ids=device_batch.tokens,
                attention_mask=device_batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=_pad_token(self.tokenizer, self._config),
                use_cache=True,
                **kwargs,
            )
        if isinstance(inputs, torch.Tensor):
            return tokens
        pads = (batch.attention_mask == 0).sum(dim=1).tolist()
        texts = [self.tokenizer.decode(row[pad:].tolist(), skip_special_tokens=True) for row, pad in zip(tokens, pads)]
        return texts[0] if isinstance(inputs, str) else texts

    def to_tokens(self, inputs: Inputs, *, padding_side: str | None = None) -> torch.Tensor:
        """The token ids `[batch, pos]` that `run` would feed the model for `inputs` (padded as `run` pads)."""
        return self._batch(inputs, padding_side=padding_side).tokens

    def to_str_tokens(self, inputs: Inputs | int) -> list[str] | list[list[str]]:
        """Each token of `inputs` as text: a list for a string or a 1-d tensor, a list per prompt otherwise."""
        if isinstance(inputs, int) and not isinstance(inputs, bool):
            inputs = torch.tensor([inputs])
        if isinstance(inputs, torch.Tensor) and inputs.dim() <= 1:
            return token_strings(self.tokenizer, inputs.reshape(-1).tolist())
        batch = self._batch(inputs)
        rows = [row[mask.bool()].tolist() for row, mask in zip(batch.tokens, batch.attention_mask)]
        strings = [token_strings(self.tokenizer, row) for row in rows]
        return strings[0] if isinstance(inputs, str) else strings

    def to_string(self, tokens: torch.Tensor | Iterable[int] | int) -> str | list[str]:
        """Token ids decoded to text: one string for one sequence, a list of strings for `[batch, pos]`."""
        if self.tokenizer is None:
            raise InputError(self._no_tokenizer("decoding tokens"))
        ids = torch.as_tensor(tokens if not isinstance(tokens, int) else [tokens])
        if ids.dim() == 2:
            return [self.tokenizer.decode(row.tolist()) for row in ids]
        return self.tokenizer.decode(ids.reshape(-1).tolist())

    def _batch(self, inputs: Inputs, attention_mask: torch.Tensor | None = None, padding_side: str | None = None) -> Batch:
        if self._config is None and isinstance(inputs, torch.Tensor):
            return Batch(inputs, None)  # any nn.Module: its input goes through unchanged
        if self.tokenizer is None and isinstance(inputs, (str, list, tuple)):
            raise InputError(self._no_tokenizer("running strings"))
        return to_batch(inputs, self.tokenizer, attention_mask, self._max_length, self._vocab_size(), padding_side)

    def _no_tokenizer(self, what: str) -> str:
        cause = f" (loading it failed: {self._tokenizer_problem})" if self._tokenizer_problem else ""
        return (
            f"{what} needs a tokenizer and this model has none{cause}: pass one to neuronmap.load(model, "
            "tokenizer=...) or give token ids"
        )

    def _vocab_size(self) -> int | None:
        embeddings = getattr(self.module, "get_input_embeddings", lambda: None)()
        return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None

    def _actions(self, capture: list[str], interventions: Mapping[str, Intervention], recorder: Recorder | None) -> dict:
        per_point: dict[str, list[Intervention]] = {}
        for pattern, value in interventions.items():
            _check_intervention(pattern, value)
            for name in self.resolve(pattern):
                per_point.setdefault(name, []).append(value)
        watched = recorder.grad_names if recorder is not None else frozenset()
        splices = self._splices
        names = [
            name for name in self._points
            if name in per_point or name in capture or name in watched or name in splices
        ]
        return {
            self._points[name]: _PointAction(
                self._points[name], per_point.get(name, []), recorder, capture=name in capture, watch=name in watched,
                splice=splices.get(name),
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


class _Splice:
    """An SAE spliced in at one hook point: what the point passes on is the SAE's output for its activation."""

    def __init__(self, sae: Any, use_error_term: bool):
        self.sae = sae
        self.use_error_term = use_error_term

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:
        return self.sae.splice(activation, self.use_error_term)


class _PointAction:
    """What happens at one hook point in one run: interventions in order, an SAE spliced in (if any), then (for
    gradients) an identity node whose gradient is recorded, then capture of the result."""

    def __init__(
        self, point: HookPoint, interventions: list[Intervention], recorder: Recorder | None, *, capture: bool, watch: bool,
        splice: _Splice | None = None,
    ):
        self.point = point
        self.interventions = interventions
        self.recorder = recorder
        self.capture = capture
        self.watch = watch
        self.splice = splice

    def __call__(self, activation: torch.Tensor) -> torch.Tensor | None:
        original = activation
        for value in self.interventions:
            activation = self._apply(value, activation)
        if self.splice is not None:
            activation = self.splice(activation)
        if self.watch:
            activation = self.recorder.watch(self.point, activation)
        if self.capture:
            self.recorder.record(self.point, activation)
        return None if activation is original else activation

    def _apply(self, value: Intervention, activation: torch.Tensor) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            replacement = value
        else:
            given = activation.clone()  # in-place edits must not reach tensors the model aliases elsewhere
            try:
                replacement = value(given, self.point)
            except NeuronMapError:
                raise
            except Exception as error:
                raise InterventionError(
                    f"intervention {_describe(value)} on {self.point.name!r} raised {type(error).__name__}: {error}"
                ) from error
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


def _check_intervention(pattern: str, value: Any) -> None:
    """Refuse, before anything runs, an intervention that is not a tensor or a function of (activation, hook)."""
    if isinstance(value, torch.Tensor):
        return
    if not callable(value):
        raise InterventionError(
            f"intervention on {pattern!r} must be a function fn(activation, hook) or a tensor, not {type(value).__name__}"
        )
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # some builtins have no signature: they are called and judged then
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise InterventionError(
            f"intervention {_describe(value)} on {pattern!r} must accept two arguments, fn(activation, hook); "
            f"its signature is {signature}"
        ) from None


def _splice_targets(saes: tuple) -> dict[str, Any]:
    """{hook name: SAE} from SAEs, lists of them and mappings, each SAE without a mapping key at its `cfg.hook_name`."""
    targets: dict[str, Any] = {}
    for item in saes:
        if isinstance(item, Mapping):
            pairs = list(item.items())
        elif isinstance(item, (list, tuple)):
            pairs = [(None, sae) for sae in item]
        else:
            pairs = [(None, item)]
        for hook, sae in pairs:
            if not callable(getattr(sae, "splice", None)) or not callable(getattr(sae, "hook_points", None)):
                raise InputError(f"cannot splice a {type(sae).__name__}: give neuronmap SAEs (neuronmap.sae.SAE)")
            hook = hook or getattr(getattr(sae, "cfg", None), "hook_name", None)
            if not hook:
                raise InputError(f"{sae!r} names no hook point (cfg.hook_name): pass saes={{hook_name: sae}}")
            if hook in targets:
                raise InputError(f"two SAEs given for {hook!r}")
            targets[hook] = sae
    if not targets:
        raise InputError("no SAE given to splice")
    return targets


def _inside(name: str, splices: Mapping[str, Any]) -> bool:
    """Whether `name` is one of the hook points an SAE spliced at one of `splices` brought."""
    return any(name.startswith(hook + ".hook_sae_") for hook in splices)


def _describe(function: Any) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _pad_token(tokenizer: Any, config: Any) -> int | None:
    for source in (tokenizer, config):
        for attribute in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attribute, None)
            if isinstance(value, int):
                return value
    return None


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
