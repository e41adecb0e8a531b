"""Each SAE architecture's training loss on a batch of activations, and the two pieces of training state that belong
to an architecture: BatchTopK's inference threshold and the unit-norm decoder.

The loss is SAELens's: the squared reconstruction error **summed over features and averaged over tokens**, plus
- standard (ReLU): `l1_coefficient` × the L1 norm of the latents, each weighted by its decoder row's norm when
  `l1_by_decoder_norm` (Anthropic's April 2024 update; SAELens always weights), summed over latents, averaged over
  tokens;
- JumpReLU: `l0_coefficient` × the number of active latents per token, averaged over tokens, whose gradient reaches
  the thresholds through the JumpReLU paper's pseudo-derivative (`activations.Step`, Rajamanoharan et al. 2024);
- TopK / BatchTopK: no sparsity term (k sets the sparsity);
- any architecture: the auxiliary-k loss on dead latents (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders", section A.2): the top `aux_k` dead latents of each token reconstruct the residual `x − x̂` of the
  live ones through the decoder (no bias), its squared error summed over features and averaged over tokens, times
  `aux_coefficient` (Gao et al. use 1/32) and times min(dead / aux_k, 1), so that a handful of dead latents does
  not pull as hard as many (as SAELens and EleutherAI's `sae` do). The dead latents' pre-activations are used as
  they are, not ReLU'd, so that a latent whose pre-activation is always negative still gets a gradient (SAELens).

`training_loss` computes all of it with autograd through `sae.encode_with_pre` and `sae.decode`, for any SAE the
package builds; the trainer computes the same numbers and gradients faster by hand (`steps`), and the tests hold the
two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SAEError
from . import activations
from .autoencoder import SAE


@dataclass
class LossParts:
    """One batch's training loss: `total = mse + sparsity + aux` (scalars), with the latents and the reconstruction
    it came from (the trainer's metrics read them)."""

    total: torch.Tensor
    mse: torch.Tensor  # squared error summed over features, mean over tokens
    sparsity: torch.Tensor  # coefficient × L1 (standard) or L0 (JumpReLU); 0 for TopK / BatchTopK
    aux: torch.Tensor  # the auxiliary-k loss on dead latents (0 when none are dead or it is off)
    acts: torch.Tensor
    recons: torch.Tensor

    def values(self) -> dict[str, float]:
        """The four loss terms as floats."""
        return {name: float(getattr(self, name)) for name in ("total", "mse", "sparsity", "aux")}


def training_loss(
    sae: SAE,
    x: torch.Tensor,
    *,
    l1_coefficient: float = 0.0,
    l1_by_decoder_norm: bool = True,
    l0_coefficient: float = 0.0,
    dead: torch.Tensor | None = None,
    aux_k: int | None = None,
    aux_coefficient: float = 0.0,
) -> LossParts:
    """The loss of `sae` (in train mode: BatchTopK ranks across the batch, JumpReLU's threshold gets its
    pseudo-gradient) on activations `x [tokens, d_in]`, differentiable with autograd.

    `l1_coefficient` applies to standard SAEs, `l0_coefficient` to JumpReLU SAEs. `dead` is a boolean mask
    `[d_sae]` of the latents counted as dead; with `aux_coefficient > 0`, the top `aux_k` of them per token
    (default `d_in // 2`, Gao et al.'s choice) fit the residual of the reconstruction.
    """
    sae.train()
    arch = sae.cfg.architecture
    acts, pre = sae.encode_with_pre(x)
    recons = sae.decode(acts)
    mse = (recons - x).pow(2).sum(-1).mean()
    zero = mse.new_zeros(())
    if arch == "standard" and l1_coefficient:
        weighted = acts * sae.W_dec_norm if l1_by_decoder_norm else acts
        sparsity = l1_coefficient * weighted.abs().sum(-1).mean()
    elif arch == "jumprelu" and l0_coefficient:
        l0 = activations.Step.apply(pre, sae.threshold, sae.bandwidth).sum(-1)
        sparsity = l0_coefficient * l0.mean()
    else:
        sparsity = zero
    aux = zero
    if aux_coefficient and dead is not None:
        aux = aux_coefficient * aux_k_loss(sae, x, recons, pre, dead, aux_k)
    return LossParts(mse + sparsity + aux, mse, sparsity, aux, acts, recons)


def aux_k_loss(sae: SAE, x: torch.Tensor, recons: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
               aux_k: int | None = None) -> torch.Tensor:
    """Gao et al.'s auxiliary loss (without its coefficient): how well the top `aux_k` dead latents of each token,
    decoded without bias, reconstruct the residual `x − recons` (held fixed), scaled by min(dead / aux_k, 1)."""
    if sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise SAEError(
            "the auxiliary-k loss needs an SAE without run-time input normalisation (its residual would be in the "
            f"normalised space), not normalize_activations={sae.cfg.normalize_activations!r}"
        )
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k_aux = aux_k if aux_k is not None else max(1, sae.cfg.d_in // 2)
    scale = min(n_dead / k_aux, 1.0)
    dead_idx = dead.nonzero().squeeze(-1)
    scores = pre.index_select(-1, dead_idx)
    if sae.cfg.rescale_acts_by_decoder_norm:
        scores = scores * sae.W_dec_norm[dead_idx]  # ranked and decoded as if the decoder rows had unit norm
    values, chosen = scores.topk(min(k_aux, n_dead), dim=-1, sorted=False)
    rows = sae.W_dec[dead_idx[chosen]]  # [tokens, k_aux, d_in]
    if sae.cfg.rescale_acts_by_decoder_norm:
        rows = rows / sae.W_dec_norm[dead_idx[chosen]][..., None]
    fit = torch.einsum("nk,nkd->nd", values, rows)
    residual = (x - recons).detach()
    return scale * (fit - residual).pow(2).sum(-1).mean()


@torch.no_grad()
def update_batchtopk_threshold(sae: SAE, acts: torch.Tensor, rate: float = 0.01) -> None:
    """Move BatchTopK's inference threshold toward this batch's smallest positive kept activation by `rate` (SAELens's
    `topk_threshold`; the trainer uses rate max(0.01, 1 / batches so far), a running mean before it becomes an
    exponential moving average, so a short run is not dragged toward SAELens's start at 0), and store it in every
    latent of `sae.threshold`, so that in eval mode the SAE is the JumpReLU SAE with that threshold. A batch with
    nothing kept leaves it as it is."""
    smallest = torch.where(acts > 0, acts, torch.full_like(acts, torch.inf)).min().to(sae.threshold.dtype)
    current = sae.threshold[:1]
    updated = (1 - rate) * current + rate * smallest
    sae.threshold.copy_(torch.where(torch.isfinite(smallest), updated, current).expand_as(sae.threshold))


@torch.no_grad()
def remove_parallel_gradient(sae: SAE) -> None:
    """Project out of each decoder row's gradient its component along the row (unit norm), so that a step moves
    the row along the unit sphere and renormalising afterwards undoes only a second-order change (as Bricken et
    al. 2023, Gao et al. 2024 and SAELens before 6.0 do)."""
    grad = sae.W_dec.grad
    if grad is not None:
        along = (grad * sae.W_dec).sum(-1, keepdim=True)
        grad.sub_(along * sae.W_dec)


@torch.no_grad()
def renormalize_decoder(sae: SAE) -> None:
    """Rescale each decoder row to unit norm (the encoder is left as it is: this is a constraint on training, not
    a change of parametrisation like `SAE.normalize_decoder`)."""
    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
