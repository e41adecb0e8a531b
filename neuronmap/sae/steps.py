"""One training step's forward and backward pass: the loss of `losses.training_loss` and its gradients, derived by
hand so that a step does only the work the maths needs.

Two families. Dense (standard, JumpReLU): the encoder and decoder products and their gradient products, with the
bias gradient of `b_dec` through the encoder taken from the summed pre-activation gradient (one matrix-vector product
where autograd would multiply the whole `[tokens, d_sae]` gradient by `W_enc`), the L1 term and ReLU's mask folded
into the products, and no tensor kept that the backward does not read. Sparse (TopK, BatchTopK, and standard SAEs
once few latents fire): only the kept latents are decoded and differentiated, as bags of decoder rows
(`embedding_bag`), so the decoder and its gradients cost `active entries × d_in` instead of `tokens × d_sae × d_in`
(Gao et al. 2024 train TopK SAEs with sparse kernels the same way); the encoder product is the one dense product left.

`forward_backward` sets each parameter's `.grad` and returns the loss terms; SAEs the hand-derived passes do not
cover (run-time input normalisation, decoder-norm rescaling, half precision, hooks attached to the SAE) go through
autograd on `training_loss` instead, with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .autoencoder import HOOKS, SAE
from .losses import training_loss


@dataclass
class StepLoss:
    """What one step measured: the loss terms (scalars), which latents fired, how many (token, latent) pairs were
    active, and for BatchTopK the kept activations (for its threshold; zeros are ignored there)."""

    total: torch.Tensor
    mse: torch.Tensor
    sparsity: torch.Tensor
    aux: torch.Tensor
    fired: torch.Tensor  # bool [d_sae]
    active: torch.Tensor | None  # number of nonzero latent activations in the batch (None if not measured)
    kept: torch.Tensor | None = None


def forward_backward(
    sae: SAE,
    x: torch.Tensor,
    *,
    l1_coefficient: float = 0.0,
    l1_by_decoder_norm: bool = True,
    l0_coefficient: float = 0.0,
    dead: torch.Tensor | None = None,
    aux_k: int | None = None,
    aux_coefficient: float = 0.0,
    by_hand: bool = True,
    measure: bool = True,
    sparse: bool = False,
) -> StepLoss:
    """The loss of `sae` on `x [tokens, d_in]` with every parameter's gradient in `.grad` (replacing what was there);
    arguments as `losses.training_loss`. `by_hand=False` forces autograd; `measure=False` may skip counting the
    active latents (a pass over `[tokens, d_sae]` that only the log needs). `sparse=True` computes a standard
    SAE's step from its active entries, as TopK's, which is faster once few latents fire (a few percent)."""
    sae.train()
    if by_hand and handles(sae):
        aux = _AuxSetup.of(sae, dead, aux_k, aux_coefficient)
        with torch.no_grad():
            arch = sae.cfg.architecture
            if arch in ("topk", "batchtopk") or (sparse and arch == "standard"):
                return _sparse(sae, x, l1_coefficient if arch == "standard" else 0.0, l1_by_decoder_norm, aux)
            return _dense(sae, x, l1_coefficient, l1_by_decoder_norm, l0_coefficient, aux, measure)
    return _autograd(sae, x, l1_coefficient, l1_by_decoder_norm, l0_coefficient, dead, aux_k, aux_coefficient)


def handles(sae: SAE) -> bool:
    """Whether the hand-derived passes cover this SAE (otherwise autograd computes the step)."""
    cfg = sae.cfg
    return (
        cfg.normalize_activations in ("none", "expected_average_only_in")
        and not cfg.rescale_acts_by_decoder_norm
        and sae.W_enc.dtype in (torch.float32, torch.float64)
        and not any(getattr(sae, name)._forward_hooks or getattr(sae, name)._forward_pre_hooks for name in HOOKS)
    )


@dataclass
class _AuxSetup:
    """The auxiliary-k loss's share of a step: the dead latents, how many of them each token uses, its weight."""

    dead_idx: torch.Tensor
    k_aux: int
    weight: float  # coefficient × min(dead / aux_k, 1)

    @classmethod
    def of(cls, sae: SAE, dead: torch.Tensor | None, aux_k: int | None, coefficient: float) -> _AuxSetup | None:
        if not coefficient or dead is None:
            return None
        dead_idx = dead.nonzero().squeeze(-1)
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return None
        k_aux = aux_k if aux_k is not None else max(1, sae.cfg.d_in // 2)
        return cls(dead_idx, min(k_aux, n_dead), coefficient * min(n_dead / k_aux, 1.0))


def _autograd(sae, x, l1_coefficient, l1_by_decoder_norm, l0_coefficient, dead, aux_k, aux_coefficient) -> StepLoss:
    for parameter in sae.parameters():
        parameter.grad = None
    with torch.enable_grad():
        parts = training_loss(sae, x, l1_coefficient=l1_coefficient, l1_by_decoder_norm=l1_by_decoder_norm,
                              l0_coefficient=l0_coefficient, dead=dead, aux_k=aux_k, aux_coefficient=aux_coefficient)
        parts.total.backward()
    if sae.cfg.architecture == "batchtopk":
        sae.threshold.grad = None  # not learned by gradient: it follows the kept activations
    acts = parts.acts.detach()
    kept = acts if sae.cfg.architecture == "batchtopk" else None
    return StepLoss(parts.total.detach(), parts.mse.detach(), parts.sparsity.detach(), parts.aux.detach(),
                    acts.amax(0) > 0, torch.count_nonzero(acts), kept)


def _dense(sae: SAE, x: torch.Tensor, l1: float, by_norm: bool, l0: float, aux: _AuxSetup | None,
           measure: bool) -> StepLoss:
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    n, two_n = x.shape[0], 2.0 / x.shape[0]
    jumprelu = sae.cfg.architecture == "jumprelu"
    sae_in = x - b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = torch.addmm(b_enc, sae_in, W_enc)
    aux_pre = pre.index_select(1, aux.dead_idx) if aux else None
    if jumprelu:
        gate = pre > sae.threshold
        acts = pre * gate
    else:
        acts = pre.clamp_min_(0)  # the ReLU in place: the backward needs only where acts > 0
    e = torch.addmm(b_dec, acts, W_dec).sub_(x)  # recons − x
    mse = torch.dot(e.view(-1), e.view(-1)) / n
    column = acts.sum(0)
    zero = mse.new_zeros(())
    extra_W_dec = None
    if jumprelu:
        g_acts = torch.addmm(b_enc, e, W_dec.T, beta=0, alpha=two_n)
        active = torch.count_nonzero(gate) if l0 or measure else None
        sparsity = l0 * active.to(mse.dtype) / n if l0 else zero
        sae.threshold.grad = _threshold_grad(pre, sae.threshold, sae.bandwidth, g_acts, l0 / n)
        g_pre = g_acts.mul_(gate)
    else:
        if l1:
            norms = W_dec.norm(dim=-1) if by_norm else torch.ones_like(b_enc)
            sparsity = l1 * torch.dot(column, norms) / n
            g_acts = torch.addmm(norms * (l1 / n), e, W_dec.T, alpha=two_n)
            if by_norm:  # d/dW_dec of (l1/n) Σ acts_i ‖d_i‖ = (l1/n) colsum_i d_i / ‖d_i‖
                extra_W_dec = W_dec * ((l1 / n) * column / norms)[:, None]
        else:
            sparsity = zero
            g_acts = torch.addmm(b_enc, e, W_dec.T, beta=0, alpha=two_n)
        g_pre = torch.ops.aten.threshold_backward.grad_input(g_acts, acts, 0.0, grad_input=g_acts)
        active = torch.count_nonzero(acts) if measure else None
    aux_loss, aux_dec = zero, None
    if aux:
        aux_loss, tokens, latents, values, g_values, g_fit = _aux(aux, aux_pre, e, W_dec)
        g_pre.view(-1).index_add_(0, tokens * g_pre.shape[1] + latents, g_values)
        aux_dec = _ByLatent(latents, tokens, W_dec.shape[0]).sum(values, g_fit)
    W_enc.grad = torch.mm(sae_in.T, g_pre)
    b_enc.grad = g_pre.sum(0)
    b_dec.grad = _b_dec_grad(sae, e.sum(0).mul_(two_n), b_enc.grad)
    if extra_W_dec is not None:
        W_dec.grad = torch.addmm(extra_W_dec, acts.T, e, alpha=two_n)
    else:
        W_dec.grad = torch.addmm(W_dec, acts.T, e, beta=0, alpha=two_n)
    if aux_dec is not None:
        W_dec.grad.add_(aux_dec)
    return StepLoss(mse + sparsity + aux_loss, mse, sparsity, aux_loss, column > 0, active)


def _sparse(sae: SAE, x: torch.Tensor, l1: float, by_norm: bool, aux: _AuxSetup | None) -> StepLoss:
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    n, d_sae, two_n = x.shape[0], W_dec.shape[0], 2.0 / x.shape[0]
    sae_in = x - b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = torch.addmm(b_enc, sae_in, W_enc)
    aux_pre = pre.index_select(1, aux.dead_idx) if aux else None
    tokens, latents, offsets, kept = _kept(sae, pre)
    acts = kept.clamp_min(0)
    positive = kept > 0
    e = F.embedding_bag(latents, W_dec, offsets, mode="sum", per_sample_weights=acts).add_(b_dec).sub_(x)
    mse = torch.dot(e.view(-1), e.view(-1)) / n
    g_e = e * two_n
    g_acts = _bag_dot(g_e, W_dec, latents, offsets, tokens).mul_(positive)
    zero = mse.new_zeros(())
    sparsity, aux_loss = zero, zero
    column = torch.zeros_like(b_enc).index_add_(0, latents, acts)  # each latent's summed activation
    if l1:  # standard SAEs: + (l1/n) Σ acts ‖d‖ (every kept entry is positive)
        norms = W_dec.norm(dim=-1) if by_norm else torch.ones_like(b_enc)
        sparsity = l1 * torch.dot(column, norms) / n
        g_acts.add_(norms[latents], alpha=l1 / n)
    dec_latents, dec_tokens, dec_weights, dec_source = latents, tokens, acts, g_e
    enc_latents, enc_tokens, enc_grads = latents, tokens, g_acts
    if aux:
        aux_loss, a_tokens, a_latents, a_values, a_grads, g_fit = _aux(aux, aux_pre, e, W_dec)
        dec_latents, enc_latents = torch.cat([latents, a_latents]), torch.cat([latents, a_latents])
        dec_tokens, enc_tokens = torch.cat([tokens, a_tokens + n]), torch.cat([tokens, a_tokens])
        dec_weights, enc_grads = torch.cat([acts, a_values]), torch.cat([g_acts, a_grads])
        dec_source = torch.cat([g_e, g_fit])
    groups = _ByLatent(dec_latents, dec_tokens, d_sae)
    W_dec.grad = groups.sum(dec_weights, dec_source)
    if l1 and by_norm:  # d/dW_dec of (l1/n) Σ acts_i ‖d_i‖ = (l1/n) colsum_i d_i / ‖d_i‖
        W_dec.grad.add_(W_dec * ((l1 / n) * column / norms)[:, None])
    # (transposed into W_enc's own layout: fused Adam reads a gradient as if laid out like its parameter)
    W_enc.grad = groups.sum(enc_grads, sae_in, enc_tokens).T.contiguous()
    b_enc.grad = torch.zeros_like(b_enc).index_add_(0, enc_latents, enc_grads)
    b_dec.grad = _b_dec_grad(sae, g_e.sum(0), b_enc.grad)
    return StepLoss(mse + sparsity + aux_loss, mse, sparsity, aux_loss, column > 0, torch.count_nonzero(positive),
                    kept if sae.cfg.architecture == "batchtopk" else None)


def _kept(sae: SAE, pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The entries the activation keeps, grouped by token: (token, latent, offsets of each token's entries, the
    pre-activation kept, which the ReLU then clamps at 0)."""
    n, d_sae = pre.shape
    arch, k = sae.cfg.architecture, sae.cfg.k
    if arch == "topk":
        values, latents = pre.topk(k, dim=-1, sorted=False)
        tokens = torch.arange(n, device=pre.device).repeat_interleave(k)
        return tokens, latents.flatten(), torch.arange(0, n * k, k, device=pre.device), values.flatten()
    relu = pre.clamp_min_(0).view(-1)
    if arch == "batchtopk":  # the k × tokens largest ReLU'd pre-activations of the batch
        flat = relu.topk(min(k * n, relu.numel()), sorted=False).indices.sort().values
    else:  # standard: every positive pre-activation
        flat = relu.nonzero().squeeze(-1)
    tokens = flat // d_sae
    counts = torch.bincount(tokens, minlength=n)
    return tokens, flat % d_sae, counts.cumsum(0).sub_(counts), relu[flat]


def _aux(aux: _AuxSetup, aux_pre: torch.Tensor, e: torch.Tensor, W_dec: torch.Tensor):
    """The auxiliary-k loss from the dead latents' pre-activations `[tokens, dead]` and the error `e = recons − x`:
    (loss, token and latent of each chosen entry, its value, the loss's gradient on it, the gradient on the fit)."""
    n = e.shape[0]
    values, chosen = aux_pre.topk(aux.k_aux, dim=-1, sorted=False)
    latents = aux.dead_idx[chosen].flatten()
    values = values.flatten()
    offsets = torch.arange(0, n * aux.k_aux, aux.k_aux, device=e.device)
    tokens = torch.arange(n, device=e.device).repeat_interleave(aux.k_aux)
    r = F.embedding_bag(latents, W_dec, offsets, mode="sum", per_sample_weights=values).add_(e)  # fit − (x − recons)
    loss = aux.weight * torch.dot(r.view(-1), r.view(-1)) / n
    g_fit = r.mul_(2.0 * aux.weight / n)
    return loss, tokens, latents, values, _bag_dot(g_fit, W_dec, latents, offsets, tokens), g_fit


def _threshold_grad(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float, g_acts: torch.Tensor,
                    g_step: float) -> torch.Tensor:
    """∂loss/∂θ through the JumpReLU paper's pseudo-derivatives: Σ over tokens of −(θ/ε)K((pre−θ)/ε)·∂/∂acts
    (the activation) and −(1/ε)K((pre−θ)/ε)·`g_step` (the L0 term), K the rectangle on (−1/2, 1/2)."""
    u = (pre - threshold) / bandwidth
    near = ((u > -0.5) & (u < 0.5)).to(pre.dtype)
    return -(threshold / bandwidth) * (near * g_acts).sum(0) - (g_step / bandwidth) * near.sum(0)


def _bag_dot(g: torch.Tensor, W: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor,
             tokens: torch.Tensor) -> torch.Tensor:
    """For each entry j, ⟨g[tokens_j], W[latents_j]⟩: the gradient of a bag decode on its weights."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W, latents, offsets, tokens, 0, -1)


class _ByLatent:
    """Entries (latent, token) grouped by latent, for sums over each latent's entries: the gradient of a bag decode
    on its table, or of a sparse encoder on its weights."""

    def __init__(self, latents: torch.Tensor, tokens: torch.Tensor, d_sae: int):
        self.order = latents.argsort(stable=True)
        counts = torch.bincount(latents, minlength=d_sae)
        self.offsets = counts.cumsum(0).sub_(counts)
        self.tokens = tokens[self.order]

    def sum(self, weights: torch.Tensor, source: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`[d_sae, d]`: row i is Σ over entries j of latent i of weights_j · source[tokens_j] (`tokens` in place of
        the grouping's own, entry for entry)."""
        rows = self.tokens if tokens is None else tokens[self.order]
        return F.embedding_bag(rows, source, self.offsets, mode="sum", per_sample_weights=weights[self.order])


def _b_dec_grad(sae: SAE, from_decoder: torch.Tensor, g_b_enc: torch.Tensor) -> torch.Tensor:
    """`b_dec` is added by the decoder and, with `apply_b_dec_to_input`, subtracted before the encoder, whose
    gradient is −W_enc · Σ_tokens ∂loss/∂pre = −W_enc · ∂loss/∂b_enc."""
    if not sae.cfg.apply_b_dec_to_input:
        return from_decoder
    return from_decoder.sub_(sae.W_enc @ g_b_enc)
