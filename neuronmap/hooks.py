"""Hook points on unmodified modules: where each one reads and writes, and scoped, exception-safe attachment.

A hook point is a named place in a model's forward pass (TransformerLens names on HF models, module paths on
any other module). Attaching actions to hook points registers plain torch hooks on the real modules; the
attention pattern and scores, which no module returns, are reached through a wrapper around the model's own
attention function. Values no module returns but its input and output determine (each head's result, a norm's
scale, position embeddings per prompt) are `Derived`: computed in a forward hook, only while attached.
Everything attached is removed when the `attached` context exits, however it exits.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .errors import InterventionError

Site = Literal["output", "input", "scores", "pattern", "derived"]
Action = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called with a hook point's activation; returns its replacement, or None to leave it unchanged."""


@dataclass(frozen=True)
class HeadSplit:
    """Where per-head activations `[batch, pos, head, d_head]` sit in a module's `[batch, pos, features]` tensor.

    `offset` skips leading features (a fused q|k|v projection); `group > 1` means each head's slice holds
    `group` interleaved parts (GPT-NeoX packs q, k, v per head) of which `part` is the one meant.
    """

    n_heads: int
    d_head: int
    offset: int = 0
    group: int = 1
    part: int = 0

    def read(self, features: torch.Tensor) -> torch.Tensor:
        """A view of `features` shaped `[..., head, d_head]` (writing to it writes to `features`)."""
        if self.group > 1:
            grouped = features.unflatten(-1, (self.n_heads, self.group * self.d_head))
            return grouped[..., self.part * self.d_head : (self.part + 1) * self.d_head]
        width = self.n_heads * self.d_head
        return features[..., self.offset : self.offset + width].unflatten(-1, (self.n_heads, self.d_head))

    def columns(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight `[in, out]` whose output features this split carves, as `[head, in, d_head]` (a view)."""
        return self.read(weight).permute(1, 0, 2)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight `[in, out]` whose input features this split carves, as `[head, d_head, out]` (a view)."""
        return self.read(weight.T).permute(1, 2, 0)


def in_out_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as `[in_features, out_features]` (`x @ W`): a view, transposed for `nn.Linear`, which
    stores `[out, in]`, and as stored for HF's `Conv1D` (GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if type(module).__name__ == "Conv1D":
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


@dataclass(frozen=True, eq=False)
class HookPoint:
    """A named activation: the module it lives on, which side of it (`site`), and how heads are carved out.

    `pos_dim` is the token dimension used when only some positions are kept (the query dimension for
    attention scores and patterns). A `"derived"` point is computed from its module's input and output by
    `derived`.
    """

    name: str
    module: nn.Module
    site: Site = "output"
    heads: HeadSplit | None = None
    pos_dim: int = 1
    derived: Derived | None = None

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.heads is None else self.heads.read(tensor)

    def write(self, tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The module-side tensor with this hook point's part replaced by `value`."""
        if self.heads is None:
            return value
        updated = tensor.clone()
        self.heads.read(updated).copy_(value)
        return updated

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, {self.site} of {type(self.module).__name__})"


@contextlib.contextmanager
def attached(actions: Mapping[HookPoint, Action], config: Any = None) -> Iterator[None]:
    """Attach `actions` to their hook points for the duration of the block; remove them all on exit.

    `config` is the HF config whose attention implementation is switched to NeuronMap's wrapper while
    attention-score or pattern hook points are attached (restored afterwards).
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    attention_entries: list[tuple[nn.Module, Site, Action]] = []
    switched = False
    try:
        for point, action in actions.items():
            if point.site == "output":
                handles.append(point.module.register_forward_hook(_output_hook(point, action)))
            elif point.site == "input":
                handles.append(point.module.register_forward_pre_hook(_input_hook(point, action), with_kwargs=True))
            elif point.site == "derived":
                handles.extend(point.derived.attach(point, action))
            else:
                entry = (point.module, point.site, action)
                _ATTENTION_ACTIONS.setdefault(point.module, []).append(entry)
                attention_entries.append(entry)
        if attention_entries:
            _switch_attention(config)
            switched = True
        yield
    finally:
        for handle in handles:
            handle.remove()
        for entry in attention_entries:
            entries = _ATTENTION_ACTIONS[entry[0]]
            entries.remove(entry)
            if not entries:
                del _ATTENTION_ACTIONS[entry[0]]
        if switched:
            _restore_attention(config)


def is_neuronmap_hook(fn: Callable) -> bool:
    """Whether a torch hook function was registered by NeuronMap (what leak checks look for)."""
    return getattr(fn, "_neuronmap_hook", None) is not None


def _output_hook(point: HookPoint, action: Action) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        tensor = _main_output(point, output)
        replacement = action(point.read(tensor))
        if replacement is None:
            return None
        return _with_main_output(output, point.write(tensor, replacement))

    hook._neuronmap_hook = point.name
    return hook


def _main_output(point: HookPoint, output: Any) -> torch.Tensor:
    """A module's output tensor (the first element when it returns a tuple)."""
    tensor = output[0] if isinstance(output, tuple) else output
    if not isinstance(tensor, torch.Tensor):
        raise InterventionError(f"hook point {point.name!r} outputs a {type(tensor).__name__}, not a tensor")
    return tensor


def _with_main_output(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _main_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    """A module's first input tensor, and its keyword when it was passed by keyword (None when positional)."""
    if args:
        return args[0], None
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return kwargs[key], key


def _input_hook(point: HookPoint, action: Action) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        tensor, key = _main_input(args, kwargs)
        replacement = action(point.read(tensor))
        if replacement is None:
            return None
        tensor = point.write(tensor, replacement)
        if key is None:
            return (tensor, *args[1:]), kwargs
        return args, {**kwargs, key: tensor}

    hook._neuronmap_hook = point.name
    return hook


# ---------------------------------------------------------------------------------------------------------------
# Derived hook points: values no module returns, computed from one module's input and output in a forward hook
# registered only while the point is attached (so an unused one costs nothing). Writing one changes the module's
# output by what the new value implies.


class Derived:
    """How a derived hook point is computed (`read`) from its module's main input and output, and what the module
    outputs once the point is replaced (`write`). `attach` registers the torch hooks doing both."""

    def read(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def write(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, read: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """The module's new output, given its input `x`, its `output`, the value `read` from them and its replacement."""
        raise NotImplementedError

    def attach(self, point: HookPoint, action: Action) -> list[torch.utils.hooks.RemovableHandle]:
        return [point.module.register_forward_hook(_derived_hook(point, action, self.read, self.write), with_kwargs=True)]


@dataclass(frozen=True, eq=False)
class HeadResults(Derived):
    """Each head's share of an attention output projection's output, `[batch, pos, head, d_model]` (TransformerLens's
    `hook_result`): the head's z (cut from the projection's input by `heads`) times that head's rows of W_O.

    Summed over heads, plus the projection's bias, it is the projection's output. Writing it changes the output by
    the sum over heads of the change in each head's result, so the output is the sum of the new results plus the
    bias (up to rounding), and entries whose results are unchanged stay bit-identical.
    """

    heads: HeadSplit

    def read(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        weight = self.heads.rows(in_out_weight(module)).to(x)
        return torch.einsum("...hd,hdm->...hm", self.heads.read(x), weight)

    def write(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, read: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        return output + (value - read).sum(-2).to(output.dtype)


@dataclass(frozen=True, eq=False)
class NormScale(Derived):
    """The scale a LayerNorm (`centred`) or RMSNorm divides its input by, `[batch, pos, 1]`, as TransformerLens
    defines `hook_scale`: sqrt(mean((x - mean(x))^2) + eps) for LayerNorm, sqrt(mean(x^2) + eps) for RMSNorm,
    computed from the norm's input in at least float32 (as HF's RMSNorm computes).

    Writing it makes the norm output its input normalised with the new scale (then its weight and bias applied),
    up to rounding; where the scale is unchanged the output stays bit-identical.
    """

    centred: bool

    def read(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return (self._centre(x).pow(2).mean(-1, keepdim=True) + _epsilon(module)).sqrt()

    def write(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, read: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        return output + (self._normalize(module, x, value) - self._normalize(module, x, read)).to(output.dtype)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def _normalize(self, module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        normalized = (self._centre(x) / scale).to(x.dtype)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        normalized = normalized if weight is None else normalized * weight
        return normalized if bias is None else normalized + bias


@dataclass(frozen=True, eq=False)
class PerPrompt(Derived):
    """A module output shared by every prompt (`[1, pos, d]`, e.g. learned position embeddings), shown as
    TransformerLens shows it, `[batch, pos, d]`: an expanded view, no copy. The batch size is read from the input
    of `model` (the HF base model) by a pre-hook attached with the point. Writing it replaces the module's output
    (a `[batch, pos, d]` value then reaches each prompt as given)."""

    model: nn.Module

    def attach(self, point: HookPoint, action: Action) -> list[torch.utils.hooks.RemovableHandle]:
        seen: dict[str, int] = {}

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for given in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
                if isinstance(given, torch.Tensor):
                    seen["batch"] = given.shape[0]
                    return

        def expand(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            return output.expand(seen.get("batch", output.shape[0]), *output.shape[1:])

        record._neuronmap_hook = point.name
        return [
            self.model.register_forward_pre_hook(record, with_kwargs=True),
            point.module.register_forward_hook(_derived_hook(point, action, expand, self.write), with_kwargs=True),
        ]

    def write(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, read: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        return value


def _derived_hook(point: HookPoint, action: Action, read: Callable, write: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        tensor = _main_output(point, output)
        x, _ = _main_input(args, kwargs)
        value = read(module, x, tensor)
        replacement = action(value)
        if replacement is None:
            return None
        return _with_main_output(output, write(module, x, tensor, value, replacement))

    hook._neuronmap_hook = point.name
    return hook


def _epsilon(norm: nn.Module) -> float:
    """A norm module's epsilon: `eps` for `nn.LayerNorm`, `variance_epsilon` for HF's RMSNorm classes."""
    return norm.eps if hasattr(norm, "eps") else norm.variance_epsilon


# ---------------------------------------------------------------------------------------------------------------
# Attention scores and patterns. HF attention modules call a function looked up by the config's attention
# implementation name. While such hook points are attached, that name is switched to a NeuronMap wrapper: the
# hooked layers compute attention eagerly with the hooks in the loop (what HF itself does for
# `output_attentions`; in float32 it is bit-identical to the family's eager function), and every other layer
# still calls the original function.

_ATTENTION_ACTIONS: dict[nn.Module, list[tuple[nn.Module, Site, Action]]] = {}
_PREFIX = "neuronmap+"
_switch_depth: dict[int, tuple[str, int]] = {}


def _switch_attention(config: Any) -> None:
    if config is None or not hasattr(config, "_attn_implementation"):
        raise InterventionError("attention scores and patterns need a Hugging Face model with an attention config")
    key = id(config)
    if key in _switch_depth:
        original, depth = _switch_depth[key]
        _switch_depth[key] = (original, depth + 1)
        return
    original = config._attn_implementation or "eager"
    _register_wrapper(original)
    _switch_depth[key] = (original, 1)
    config._attn_implementation = _PREFIX + original


def _restore_attention(config: Any) -> None:
    original, depth = _switch_depth[id(config)]
    if depth > 1:
        _switch_depth[id(config)] = (original, depth - 1)
        return
    del _switch_depth[id(config)]
    config._attn_implementation = original


def _register_wrapper(original: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _PREFIX + original
    if name in AttentionInterface._global_mapping:
        return

    def attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return _hooked_attention(original, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _original_attention(original: str, module: nn.Module) -> Callable:
    if original != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[original]
    # Each HF family defines its own eager function in its modeling module; use exactly that one.
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", _eager_attention)


def _hooked_attention(original, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    entries = _ATTENTION_ACTIONS.get(module)
    if not entries:
        attention = _original_attention(original, module)
        return attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, entries=entries, **kwargs)


def _run_actions(entries, site: Site, tensor: torch.Tensor) -> torch.Tensor:
    for _, entry_site, action in entries:
        if entry_site == site:
            replacement = action(tensor)
            tensor = tensor if replacement is None else replacement
    return tensor


def _masked_scores(module, query, key, attention_mask, scaling, kwargs) -> torch.Tensor:
    """Pre-softmax scores `[batch, head, query, key]` with masked positions at the dtype's minimum (as HF eager).

    Works in place on the fresh matmul result, so a layer holds one score-sized tensor, not three.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    minimum = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            return scores.masked_fill_(~mask, minimum)
        return scores.add_(mask)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, k_len = query.shape[-2], key.shape[-2]
    if is_causal and q_len > 1:
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu_(k_len - q_len + 1)
        return scores.masked_fill_(future, minimum)
    return scores


def _repeat_kv(states: torch.Tensor, repeats: int) -> torch.Tensor:
    return states if repeats == 1 else states.repeat_interleave(repeats, dim=1)


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, entries=(), **kwargs):
    """Eager attention with `entries`' actions applied to the scores and the pattern (also the fallback for
    families whose modeling module defines no eager function of its own)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key = _repeat_kv(key, query.shape[1] // key.shape[1])
    value = _repeat_kv(value, query.shape[1] // value.shape[1])
    scores = _run_actions(entries, "scores", _masked_scores(module, query, key, attention_mask, scaling, kwargs))
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = _run_actions(entries, "pattern", pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), pattern
