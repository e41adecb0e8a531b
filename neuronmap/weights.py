"""A model's weights shaped as in TransformerLens, read from the unmodified HF modules.

`Weights(model)` gives `W_E [d_vocab, d_model]`, `W_U [d_model, d_vocab]`, `b_U`, `W_pos [n_ctx, d_model]`, and per
block (`weights.blocks[L].attn.W_Q`, `weights.blocks[L].mlp.W_in`, as on TransformerLens's `model.blocks[L]`) or
stacked over blocks (`weights.W_Q [n_layers, n_heads, d_model, d_head]`, as TransformerLens's `model.W_Q`):

- `W_Q`, `W_K`, `W_V` `[n_heads, d_model, d_head]` and `b_Q`, `b_K`, `b_V` `[n_heads, d_head]`, so that
  `blocks.L.attn.hook_q == ln1.hook_normalized @ W_Q + b_Q` per head (before rotary embeddings, as `hook_q` is);
  under grouped-query attention `_W_K`, `_W_V`, `_b_K`, `_b_V` have the key-value heads, and `W_K`, `W_V`, `b_K`,
  `b_V` repeat each of them for its query heads, as TransformerLens's `GroupedQueryAttention` does;
- `W_O [n_heads, d_head, d_model]`, `b_O [d_model]`: `hook_result = z @ W_O` per head, summed plus `b_O` is
  `hook_attn_out`;
- `W_in [d_model, d_mlp]`, `W_gate` (gated MLPs: the gate projection; `W_in` is then the up projection; None
  otherwise), `W_out [d_mlp, d_model]`, `b_in`, `b_out`.

Each is computed when read, from the modules the hook points live on, split into heads exactly as those hook
points are, so it always reflects the current parameters. Per-block tensors are views of the HF parameters
(detached: no gradient tracking); a repeated GQA key/value weight and the stacked tensors are copies; a bias the
model does not have is zeros, as in TransformerLens. Nothing here ever writes to a parameter. The weights are
TransformerLens's *unfolded* ones (no LayerNorm folding, no centring): they act on `hook_normalized`, the norms'
outputs with their weight and bias applied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .architectures import ADAPTERS
from .errors import WeightError
from .hooks import HookPoint, in_out_weight


def _stacked(part: str, name: str, shape: str) -> property:
    """A property stacking `blocks[L].<part>.<name>` over blocks (a copy, as TransformerLens's `model.W_Q`)."""

    def stack(self: Weights) -> torch.Tensor | None:
        tensors = [getattr(getattr(block, part), name) for block in self.blocks]
        return None if tensors[0] is None else torch.stack(tensors)

    return property(stack, doc=f"`{shape}`: `blocks[L].{part}.{name}` stacked over blocks (a copy).")


class Weights:
    """TransformerLens-shaped weights of an HF model of a family NeuronMap has an adapter for (see the module doc)."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ADAPTERS:
            raise WeightError(
                f"TransformerLens-shaped weights need a Hugging Face model of a family with an adapter "
                f"({', '.join(sorted(ADAPTERS))}); this is a {type(model).__name__}"
                + (f" of model type {model_type!r}" if model_type else "")
            )
        self.model = model
        self.model_type = model_type
        self._points = {point.name: point for point in ADAPTERS[model_type](model)}
        n_layers = sum(1 for name in self._points if name.endswith(".attn.hook_q"))
        self.blocks = [BlockWeights(self._points, layer) for layer in range(n_layers)]

    def __repr__(self) -> str:
        attn = self.blocks[0].attn
        return (
            f"Weights({self.model_type}: {len(self.blocks)} layers × {attn.n_heads} heads, "
            f"d_model {self.W_E.shape[1]}, d_head {attn.W_Q.shape[2]}, d_mlp {self.blocks[0].mlp.W_in.shape[1]}, "
            f"d_vocab {self.W_E.shape[0]})"
        )

    @property
    def W_E(self) -> torch.Tensor:
        """`[d_vocab, d_model]`: the token embedding (a view)."""
        return self._points["hook_embed"].module.weight.detach()

    @property
    def W_pos(self) -> torch.Tensor:
        """`[n_ctx, d_model]`: the learned position embedding, row p for the token at position p (a view).

        RoBERTa's positions start after its padding index, so its rows before that are left out.
        """
        point = self._points.get("hook_pos_embed")
        if point is None:
            raise WeightError(self._no_positions())
        embedding = point.module
        first = 0 if embedding.padding_idx is None else embedding.padding_idx + 1
        return embedding.weight.detach()[first:]

    @property
    def W_U(self) -> torch.Tensor:
        """`[d_model, d_vocab]`: the unembedding, the language-model head's output layer (a view; for a masked LM,
        the decoder that follows the head's own transform)."""
        return _weight(self._unembedding())

    @property
    def b_U(self) -> torch.Tensor:
        """`[d_vocab]`: the language-model head's bias (zeros when it has none, as TransformerLens)."""
        head = self._unembedding()
        return _bias_or_zeros(head, _weight(head).shape[1])

    W_Q = _stacked("attn", "W_Q", "[n_layers, n_heads, d_model, d_head]")
    W_K = _stacked("attn", "W_K", "[n_layers, n_heads, d_model, d_head]")
    W_V = _stacked("attn", "W_V", "[n_layers, n_heads, d_model, d_head]")
    W_O = _stacked("attn", "W_O", "[n_layers, n_heads, d_head, d_model]")
    b_Q = _stacked("attn", "b_Q", "[n_layers, n_heads, d_head]")
    b_K = _stacked("attn", "b_K", "[n_layers, n_heads, d_head]")
    b_V = _stacked("attn", "b_V", "[n_layers, n_heads, d_head]")
    b_O = _stacked("attn", "b_O", "[n_layers, d_model]")
    W_in = _stacked("mlp", "W_in", "[n_layers, d_model, d_mlp]")
    W_gate = _stacked("mlp", "W_gate", "[n_layers, d_model, d_mlp] (None unless the MLP is gated)")
    W_out = _stacked("mlp", "W_out", "[n_layers, d_mlp, d_model]")
    b_in = _stacked("mlp", "b_in", "[n_layers, d_mlp]")
    b_out = _stacked("mlp", "b_out", "[n_layers, d_model]")

    def _unembedding(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if head is None:
            raise WeightError(
                f"this {type(self.model).__name__} has no language-model head, so no unembedding W_U: load the model "
                f"with its head (e.g. AutoModelForCausalLM, or AutoModelForMaskedLM for an encoder)"
            )
        return head

    def _no_positions(self) -> str:
        rotary = any("rotary" in type(module).__name__.lower() for module in self.model.modules())
        why = (
            "it uses rotary position embeddings (q and k are rotated inside each attention layer)"
            if rotary
            else "it has no learned position embeddings"
        )
        return f"this {self.model_type} model has no W_pos: {why}, so there is no [n_ctx, d_model] matrix to show"


class BlockWeights:
    """One block's weights: `.attn` and `.mlp`, as on TransformerLens's `model.blocks[L]`."""

    def __init__(self, points: Mapping[str, HookPoint], layer: int):
        def at(suffix: str) -> HookPoint | None:
            return points.get(f"blocks.{layer}.{suffix}")

        self.attn = AttentionWeights(at("attn.hook_q"), at("attn.hook_k"), at("attn.hook_v"), at("attn.hook_z"))
        self.mlp = MLPWeights(at("mlp.hook_pre"), at("mlp.hook_pre_linear"), at("mlp.hook_post"))


class AttentionWeights:
    """One block's attention weights: the projections behind `attn.hook_q/k/v` and the one `attn.hook_z` enters."""

    def __init__(self, q: HookPoint, k: HookPoint, v: HookPoint, z: HookPoint):
        self._points = {"Q": q, "K": k, "V": v}
        self._z = z

    @property
    def n_heads(self) -> int:
        return self._points["Q"].heads.n_heads

    @property
    def W_Q(self) -> torch.Tensor:
        """`[n_heads, d_model, d_head]`: query weights (a view)."""
        return self._columns("Q")

    @property
    def W_K(self) -> torch.Tensor:
        """`[n_heads, d_model, d_head]`: key weights, each key-value head repeated for its query heads under GQA."""
        return self._repeated(self._W_K)

    @property
    def W_V(self) -> torch.Tensor:
        """`[n_heads, d_model, d_head]`: value weights, each key-value head repeated for its query heads under GQA."""
        return self._repeated(self._W_V)

    @property
    def _W_K(self) -> torch.Tensor:
        """`[n_key_value_heads, d_model, d_head]`: key weights as stored (TransformerLens's `_W_K`; a view)."""
        return self._columns("K")

    @property
    def _W_V(self) -> torch.Tensor:
        """`[n_key_value_heads, d_model, d_head]`: value weights as stored (TransformerLens's `_W_V`; a view)."""
        return self._columns("V")

    @property
    def b_Q(self) -> torch.Tensor:
        """`[n_heads, d_head]`: query bias (zeros when the model has none)."""
        return self._bias("Q")

    @property
    def b_K(self) -> torch.Tensor:
        """`[n_heads, d_head]`: key bias, repeated under GQA (zeros when the model has none)."""
        return self._repeated(self._b_K)

    @property
    def b_V(self) -> torch.Tensor:
        """`[n_heads, d_head]`: value bias, repeated under GQA (zeros when the model has none)."""
        return self._repeated(self._b_V)

    @property
    def _b_K(self) -> torch.Tensor:
        """`[n_key_value_heads, d_head]`: key bias as stored (TransformerLens's `_b_K`)."""
        return self._bias("K")

    @property
    def _b_V(self) -> torch.Tensor:
        """`[n_key_value_heads, d_head]`: value bias as stored (TransformerLens's `_b_V`)."""
        return self._bias("V")

    @property
    def W_O(self) -> torch.Tensor:
        """`[n_heads, d_head, d_model]`: each head's rows of the output projection (a view)."""
        return self._z.heads.rows(_weight(self._z.module))

    @property
    def b_O(self) -> torch.Tensor:
        """`[d_model]`: the output projection's bias (zeros when it has none)."""
        return _bias_or_zeros(self._z.module, _weight(self._z.module).shape[1])

    def _columns(self, part: str) -> torch.Tensor:
        point = self._points[part]
        return point.heads.columns(_weight(point.module))

    def _bias(self, part: str) -> torch.Tensor:
        point = self._points[part]
        if point.module.bias is None:
            return _zeros(point.module, point.heads.n_heads, point.heads.d_head)
        return point.heads.read(point.module.bias.detach())

    def _repeated(self, kv: torch.Tensor) -> torch.Tensor:
        repeats = self.n_heads // kv.shape[0]
        return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=0)


class MLPWeights:
    """One block's MLP weights: the projections behind `mlp.hook_pre` (and `mlp.hook_pre_linear` when gated) and
    the one `mlp.hook_post` enters."""

    def __init__(self, pre: HookPoint, pre_linear: HookPoint | None, post: HookPoint):
        self._in = (pre_linear or pre).module
        self._gate = pre.module if pre_linear is not None else None
        self._out = post.module

    @property
    def W_in(self) -> torch.Tensor:
        """`[d_model, d_mlp]`: the input projection (the up projection of a gated MLP; a view)."""
        return _weight(self._in)

    @property
    def W_gate(self) -> torch.Tensor | None:
        """`[d_model, d_mlp]`: the gate projection of a gated MLP (a view); None for other MLPs."""
        return None if self._gate is None else _weight(self._gate)

    @property
    def W_out(self) -> torch.Tensor:
        """`[d_mlp, d_model]`: the output projection (a view)."""
        return _weight(self._out)

    @property
    def b_in(self) -> torch.Tensor:
        """`[d_mlp]`: the input projection's bias (zeros when it has none)."""
        return _bias_or_zeros(self._in, _weight(self._in).shape[1])

    @property
    def b_out(self) -> torch.Tensor:
        """`[d_model]`: the output projection's bias (zeros when it has none)."""
        return _bias_or_zeros(self._out, _weight(self._out).shape[1])


def _weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight as `[in, out]`, detached (a view)."""
    return in_out_weight(module).detach()


def _bias_or_zeros(module: nn.Module, size: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return _zeros(module, size) if bias is None else bias.detach()


def _zeros(module: nn.Module, *shape: int) -> torch.Tensor:
    """Zeros standing for a bias the module does not have, on its weight's device and in its dtype."""
    return torch.zeros(*shape, dtype=module.weight.dtype, device=module.weight.device)

