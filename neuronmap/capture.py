"""What a run keeps: captured activations cut to the requested positions, cast and moved, and, on request, the
gradients that reach hook points in a later backward pass.

Positions are checked against the inputs' length before the forward pass, so a position past the end is an
error naming it instead of an index that silently wraps around.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from .errors import InputError
from .hooks import HookPoint
from .inputs import Batch

Positions = Union[int, slice, Sequence[int], torch.Tensor, str, None]


class PositionSelection:
    """Validated `capture_positions`: which token positions of an activation are kept (the dimension stays).

    `positions` is None (all), an int, a slice, a sequence or 1-d integer tensor of positions (negative ones
    count from the end, as in Python), or `"last"` for each prompt's last real token. Positions index the
    padded batch, exactly as `activation[:, positions]` would, and must lie within it.
    """

    def __init__(self, positions: Positions, batch: Batch, length: int | None):
        """`length` is the inputs' token count, or None when only the activations will tell (any nn.Module)."""
        self.last: torch.Tensor | None = None
        self.index: slice | torch.Tensor | None = None
        self._given: Positions = None
        if isinstance(positions, str):
            if positions != "last":
                raise InputError(f"capture_positions {positions!r} is not valid; did you mean 'last'?")
            if batch.attention_mask is None:
                raise InputError("capture_positions='last' needs token inputs with an attention mask; use -1")
            self.last = batch.last_positions
        elif positions is not None:
            self._check_type(positions)
            self._given = positions
            if length is not None:
                self.index = self._resolve(length)

    def apply(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` cut to the selected positions along `dim`."""
        if self.last is not None:
            rows = torch.arange(tensor.shape[0], device=tensor.device)
            return tensor.movedim(dim, 1)[rows, self.last.to(tensor.device)].unsqueeze(1).movedim(1, dim)
        index = self.index
        if index is None and self._given is not None:
            index = self._resolve(tensor.shape[dim])  # a module without a known length: checked when seen
        if index is None:
            return tensor
        if isinstance(index, slice):
            return tensor[(slice(None),) * dim + (index,)]
        return tensor.index_select(dim, index.to(tensor.device))

    def _check_type(self, positions: Positions) -> None:
        if isinstance(positions, bool) or (isinstance(positions, torch.Tensor) and positions.dtype == torch.bool):
            raise InputError("capture_positions must be positions (ints), not booleans")
        if isinstance(positions, (int, slice)):
            return
        if isinstance(positions, torch.Tensor):
            if positions.dtype.is_floating_point or positions.dim() > 1:
                raise InputError(
                    f"capture_positions as a tensor must be a 0-d or 1-d integer tensor, got {positions.dtype} "
                    f"of shape {list(positions.shape)}"
                )
            return
        if not isinstance(positions, Sequence) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions
        ):
            raise InputError(
                f"capture_positions must be an int, a slice, a list of ints, an integer tensor or 'last', "
                f"not {positions!r}"
            )

    def _resolve(self, length: int) -> slice | torch.Tensor:
        given = self._given
        if isinstance(given, slice):
            if given.step == 0:
                raise InputError("capture_positions slice step cannot be zero")
            start, stop, step = given.indices(length)
            if not range(start, stop, step):
                raise InputError(f"capture_positions {given} selects no position of inputs {length} tokens long")
            if step > 0:
                return slice(start, stop, step)
            return torch.arange(start, stop, step)
        if isinstance(given, int):
            return slice(_within(given, length), _within(given, length) + 1)
        listed = given.flatten().tolist() if isinstance(given, torch.Tensor) else list(given)
        if not listed:
            raise InputError("capture_positions is an empty list: give at least one position")
        return torch.tensor([_within(p, length) for p in listed], dtype=torch.long)


def _within(position: int, length: int) -> int:
    if not -length <= position < length:
        raise InputError(
            f"capture_positions {position} is out of range: the inputs are {length} tokens long "
            f"(positions {-length} to {length - 1})"
        )
    return position % length


class AllRecorded(Exception):
    """Raised by a `Recorder` with `stop_when_recorded` once every named activation is kept: ends the forward pass."""


class Recorder:
    """Keeps captured activations (moved, cast and cut to the requested positions, without extra copies), and
    the gradients reaching the hook points named in `grad_names` during backward passes.

    When `stop_when_recorded` names hook points, recording the last of them raises `AllRecorded`, so a run that
    needs nothing downstream stops there. With `keep_graph`, captures stay in the autograd graph (a metric computed from them can be differentiated).
    A gradient is cut, cast and moved like the activation; each backward pass that reaches the point replaces
    it (as TransformerLens's backward-hook caches do), and it is also set as the `.grad` of the captured
    activation when that point was captured too.
    """

    def __init__(
        self,
        selection: PositionSelection,
        device: str | torch.device | None,
        dtype: torch.dtype | None,
        keep_graph: bool = False,
        grad_names: frozenset[str] = frozenset(),
    ):
        self.activations: dict[str, torch.Tensor] = {}
        self.gradients: dict[str, torch.Tensor] = {}
        self.selection = selection
        self.device = device
        self.dtype = dtype
        self.keep_graph = keep_graph
        self.grad_names = grad_names
        self.stop_when_recorded: frozenset[str] | None = None

    def record(self, point: HookPoint, activation: torch.Tensor) -> None:
        self.activations[point.name] = self._keep(point, activation if self.keep_graph else activation.detach())
        if self.stop_when_recorded is not None and self.stop_when_recorded.issubset(self.activations):
            raise AllRecorded

    def watch(self, point: HookPoint, activation: torch.Tensor) -> torch.Tensor:
        """An identity node standing for `activation` downstream, whose gradient is recorded in the backward pass.

        A fresh node (rather than the activation itself) because a hook point may be a view of what its module
        passes on (one head's slice of a projection input), which the backward pass never reaches.
        """
        if activation.requires_grad:
            node = activation.view_as(activation)
        else:  # frozen weights upstream: the gradient still reaches this point, and nothing before it needs one
            node = activation.detach().requires_grad_()
        node.register_hook(lambda grad: self._gradient(point, grad))
        return node

    def _gradient(self, point: HookPoint, grad: torch.Tensor) -> None:
        kept = self._keep(point, grad.detach())
        self.gradients[point.name] = kept
        captured = self.activations.get(point.name)
        if captured is not None and not (captured.is_leaf and captured.requires_grad):
            captured.grad = kept  # (a leaf, when nothing upstream needs a gradient, gets its .grad from autograd itself)

    def _keep(self, point: HookPoint, tensor: torch.Tensor) -> torch.Tensor:
        kept = self.selection.apply(tensor, point.pos_dim)
        kept = kept.to(device=self.device or kept.device, dtype=self.dtype or kept.dtype)
        if kept.untyped_storage().nbytes() > kept.numel() * kept.element_size():
            kept = kept.clone()  # a view would keep its whole base tensor alive
        return kept
