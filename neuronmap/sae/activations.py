"""The four SAE activation functions, and the JumpReLU paper's pseudo-derivatives that make its threshold trainable.

TopK keeps the k largest pre-activations of each token (then ReLU); BatchTopK keeps the k × tokens largest of a
whole batch, so tokens share a budget of k on average; JumpReLU zeroes every pre-activation at or below its latent's
threshold. A step function has no useful gradient, so JumpReLU training uses the straight-through estimator with a
rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024, "Jumping Ahead", eq. 11-12).
"""

from __future__ import annotations

import torch


def relu(pre: torch.Tensor) -> torch.Tensor:
    return pre.relu()


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest pre-activations of each token, ReLU'd, in place of the rest (zeros)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The k × tokens largest ReLU'd pre-activations across all tokens of the batch (the rest zero)."""
    acts = pre.relu()
    flat = acts.flatten()
    tokens = flat.numel() // pre.shape[-1]
    values, indices = flat.topk(min(k * tokens, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(-1, indices, values).view_as(pre)


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReLU(pre) where pre exceeds the latent's threshold, else zero (as SAELens computes it at inference)."""
    return pre.relu() * (pre > threshold).to(pre.dtype)


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The paper's kernel K: 1 on (-1/2, 1/2), else 0."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); ∂/∂pre = H(pre − θ), ∂/∂θ = −(θ/ε) K((pre − θ)/ε) (summed over tokens)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold).to(grad.dtype) * grad
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad
        return grad_pre, _sum_to(grad_threshold, threshold), None


class Step(torch.autograd.Function):
    """H(pre − θ), for the L0 penalty; ∂/∂pre = 0, ∂/∂θ = −(1/ε) K((pre − θ)/ε) (summed over tokens)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), _sum_to(grad_threshold, threshold), None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, *like.shape).sum(0) if grad.shape != like.shape else grad
