"""Each SAE architecture's training forward pass, loss and gradients against a reference written here by hand
(float64, small random data): the autograd loss (`losses.training_loss`) and the hand-derived step
(`steps.forward_backward`) must both equal it. Also: exactly k latents per token (TopK) and k × tokens per batch
(BatchTopK), the JumpReLU threshold's pseudo-derivative, the auxiliary-k loss, BatchTopK's threshold, the unit-norm
decoder, the schedules, and the geometric median."""

from __future__ import annotations

import math

import pytest
import torch

from neuronmap.sae import SAE
from neuronmap.sae import losses, steps
from neuronmap.sae.training import Trainer, geometric_median

D_IN, D_SAE, TOKENS, K = 12, 40, 30, 4
ARCHITECTURES = ["standard", "topk", "batchtopk", "jumprelu"]
BANDWIDTH = 0.4


def make_sae(architecture: str, seed: int = 0, apply_b_dec: bool = True) -> SAE:
    """An SAE in float64 with every parameter random (decoder rows of uneven norm, thresholds spread around the
    pre-activations), so no term of the loss or gradient is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    k = {"k": K} if architecture in ("topk", "batchtopk") else {}
    sae = SAE(architecture, D_IN, D_SAE, seed=seed, dtype="float64", apply_b_dec_to_input=apply_b_dec, **k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g, dtype=torch.float64) / 2)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g, dtype=torch.float64) / 2)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g, dtype=torch.float64) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g, dtype=torch.float64))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64))
    sae.bandwidth = BANDWIDTH
    return sae


def data(seed: int = 1) -> torch.Tensor:
    return torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


# --- the reference, written from the papers' definitions ------------------------------------------------------------


def reference_acts(architecture: str, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    if architecture == "standard":
        return torch.where(pre > 0, pre, torch.zeros_like(pre))
    if architecture == "jumprelu":
        return pre * (pre > threshold).to(pre.dtype).detach()  # ∂/∂pre = H(pre − θ); θ's gradient is checked by hand
    if architecture == "topk":  # per token: the k largest, then ReLU
        kth = pre.sort(dim=-1, descending=True).values[:, K - 1 : K]
        return torch.where((pre >= kth) & (pre > 0), pre, torch.zeros_like(pre))
    # BatchTopK: the k × tokens largest of the ReLU'd batch
    relu = torch.where(pre > 0, pre, torch.zeros_like(pre))
    cut = relu.flatten().sort(descending=True).values[K * pre.shape[0] - 1]
    return torch.where((relu >= cut) & (relu > 0), relu, torch.zeros_like(pre))


def reference(architecture: str, sae: SAE, x: torch.Tensor, *, l1=0.0, by_norm=True, l0=0.0, dead=None, aux_k=None,
              aux_coefficient=0.0) -> dict:
    """Loss terms and gradients of the loss as the docstring of `losses` defines it, by autograd on plain formulas
    (and by hand for the JumpReLU threshold)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    threshold = sae.threshold.detach() if architecture == "jumprelu" else None
    n = x.shape[0]
    sae_in = x - b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = sae_in @ W_enc + b_enc
    acts = reference_acts(architecture, pre, threshold)
    recons = acts @ W_dec + b_dec
    mse = ((recons - x) ** 2).sum() / n
    sparsity = torch.zeros((), dtype=torch.float64)
    if architecture == "standard":
        norms = torch.sqrt((W_dec**2).sum(-1)) if by_norm else torch.ones(D_SAE, dtype=torch.float64)
        sparsity = l1 * (acts.abs() * norms).sum() / n
    if architecture == "jumprelu":
        sparsity = l0 * (pre > threshold).sum().to(torch.float64) / n
    aux = torch.zeros((), dtype=torch.float64)
    if aux_coefficient and dead is not None and dead.any():
        aux = aux_coefficient * reference_aux(pre, dead, W_dec, (x - recons).detach(), aux_k)
    total = mse + sparsity + aux
    total.backward()
    grads = {"W_enc": W_enc.grad, "b_enc": b_enc.grad, "W_dec": W_dec.grad, "b_dec": b_dec.grad}
    if architecture == "jumprelu":
        grads["threshold"] = reference_threshold_grad(pre.detach(), threshold, (2 / n) * (recons - x).detach() @ W_dec.detach().T, l0 / n)
    return {"pre": pre.detach(), "acts": acts.detach(), "recons": recons.detach(), "mse": mse.detach(),
            "sparsity": sparsity.detach(), "aux": aux.detach(), "total": total.detach(), "grads": grads}


def reference_aux(pre, dead, W_dec, residual, aux_k) -> torch.Tensor:
    """Gao et al. A.2: per token, the aux_k dead latents with the largest pre-activation decode (no bias) the residual;
    scaled by min(dead / aux_k, 1)."""
    n_dead = int(dead.sum())
    k_aux = aux_k if aux_k is not None else D_IN // 2
    scale = min(n_dead / k_aux, 1.0)
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    kth = masked.sort(dim=-1, descending=True).values[:, min(k_aux, n_dead) - 1 : min(k_aux, n_dead)]
    chosen = torch.where(dead & (masked >= kth), pre, torch.zeros_like(pre))
    return scale * ((chosen @ W_dec - residual) ** 2).sum() / pre.shape[0]


def reference_threshold_grad(pre, threshold, g_acts, g_l0) -> torch.Tensor:
    """The JumpReLU paper's pseudo-derivatives (eq. 11-12) with the rectangle kernel K(u) = 1 on (−½, ½):
    ∂L/∂θ_i = Σ_n [−(θ_i/ε) K((pre_ni − θ_i)/ε) ∂L/∂a_ni − (1/ε) K((pre_ni − θ_i)/ε) ∂L/∂L0_n]."""
    grad = torch.zeros(D_SAE, dtype=torch.float64)
    for i in range(D_SAE):
        for n in range(pre.shape[0]):
            u = (pre[n, i] - threshold[i]) / BANDWIDTH
            if -0.5 < u < 0.5:
                grad[i] += -(threshold[i] / BANDWIDTH) * g_acts[n, i] - g_l0 / BANDWIDTH
    return grad


def gradients(sae: SAE) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


SETTINGS = {"l1_coefficient": 0.7, "l0_coefficient": 0.9, "l1_by_decoder_norm": True}
# autograd on `training_loss`, the hand-derived step, and (standard SAEs) the hand-derived step on active entries only
MODES = [{"by_hand": False}, {"by_hand": True}, {"by_hand": True, "sparse": True}]


# --- forward, loss, gradients ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_forward_equals_the_reference(architecture):
    sae, x = make_sae(architecture), data()
    ref = reference(architecture, sae, x)
    sae.train()
    acts, pre = sae.encode_with_pre(x)
    torch.testing.assert_close(pre, ref["pre"], rtol=0, atol=1e-12)
    torch.testing.assert_close(acts, ref["acts"], rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.decode(acts), ref["recons"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loss_and_gradients_equal_the_reference(architecture, apply_b_dec):
    sae, x = make_sae(architecture, apply_b_dec=apply_b_dec), data()
    ref = reference(architecture, sae, x, l1=0.7, l0=0.9)
    parts = losses.training_loss(sae, x, **{k: v for k, v in SETTINGS.items()})
    for term in ("mse", "sparsity", "total"):
        torch.testing.assert_close(getattr(parts, term), ref[term], rtol=1e-12, atol=1e-12)
    assert float(parts.sparsity.detach()) > 0 or architecture in ("topk", "batchtopk")
    for mode in MODES:
        out = steps.forward_backward(sae, x, **mode, **SETTINGS)
        torch.testing.assert_close(out.total, ref["total"], rtol=1e-12, atol=1e-12)
        assert int(out.active) == int((ref["acts"] != 0).sum())
        grads = gradients(sae)
        expected = ref["grads"]
        assert set(grads) == set(expected), mode
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12, msg=f"{name} ({mode})")


def test_standard_l1_without_decoder_norms_is_the_plain_l1():
    sae, x = make_sae("standard"), data()
    ref = reference("standard", sae, x, l1=0.7, by_norm=False)
    parts = losses.training_loss(sae, x, l1_coefficient=0.7, l1_by_decoder_norm=False)
    torch.testing.assert_close(parts.sparsity, 0.7 * ref["acts"].sum() / TOKENS)
    for mode in MODES:
        out = steps.forward_backward(sae, x, l1_coefficient=0.7, l1_by_decoder_norm=False, **mode)
        torch.testing.assert_close(out.total, ref["total"])
        for name, grad in gradients(sae).items():
            torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-10, atol=1e-12)


def test_jumprelu_threshold_gradient_is_the_papers_pseudo_derivative():
    sae, x = make_sae("jumprelu"), data()
    n = x.shape[0]
    sae.train()
    acts, pre = sae.encode_with_pre(x)
    recons = sae.decode(acts)
    near = (((pre - sae.threshold) / BANDWIDTH).abs() < 0.5).sum()
    assert near > 20  # the kernel sees enough pre-activations for the check to mean something
    by_hand = reference_threshold_grad(pre.detach(), sae.threshold.detach(),
                                       (2 / n) * (recons - x).detach() @ sae.W_dec.detach().T, 0.9 / n)
    for by_hand_step in (False, True):
        steps.forward_backward(sae, x, l0_coefficient=0.9, by_hand=by_hand_step)
        torch.testing.assert_close(sae.threshold.grad, by_hand, rtol=1e-10, atol=1e-12)


def test_topk_keeps_exactly_k_latents_per_token():
    sae, x = make_sae("topk"), data()
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every pre-activation positive: the ReLU removes nothing, so exactly k remain
    sae.train()
    acts, pre = sae.encode_with_pre(x)
    assert ((acts != 0).sum(-1) == K).all()
    kept = torch.where(acts != 0, pre, torch.full_like(pre, math.inf)).amin(-1)
    dropped = torch.where(acts == 0, pre, torch.full_like(pre, -math.inf)).amax(-1)
    assert (kept >= dropped).all()  # the k kept are the k largest
    out = steps.forward_backward(sae, x)
    assert int(out.active) == K * TOKENS


def test_batchtopk_keeps_exactly_k_times_tokens_latents_per_batch():
    sae, x = make_sae("batchtopk"), data()
    with torch.no_grad():
        sae.b_enc.fill_(50.0)
    sae.train()
    acts, pre = sae.encode_with_pre(x)
    per_token = (acts != 0).sum(-1)
    assert int(per_token.sum()) == K * TOKENS
    assert per_token.min() != per_token.max()  # shared across the batch, not k per token
    assert acts[acts != 0].min() >= pre[acts == 0].max()
    out = steps.forward_backward(sae, x)
    assert int(out.active) == K * TOKENS


# --- auxiliary-k loss --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dead_count", [3, 17])  # fewer dead latents than aux_k, and more
def test_aux_k_loss_and_gradients_equal_the_hand_formula(architecture, dead_count):
    sae, x = make_sae(architecture), data()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(dead_count))[:dead_count]] = True
    aux_k = 5
    ref = reference(architecture, sae, x, l1=0.7, l0=0.9, dead=dead, aux_k=aux_k, aux_coefficient=0.25)
    assert float(ref["aux"]) > 0
    sae.train()
    acts, pre = sae.encode_with_pre(x)
    alone = losses.aux_k_loss(sae, x, sae.decode(acts), pre, dead, aux_k)
    torch.testing.assert_close(0.25 * alone, ref["aux"], rtol=1e-12, atol=1e-12)
    for mode in MODES:
        out = steps.forward_backward(sae, x, dead=dead, aux_k=aux_k, aux_coefficient=0.25, **mode, **SETTINGS)
        torch.testing.assert_close(out.aux, ref["aux"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.total, ref["total"], rtol=1e-12, atol=1e-12)
        for name, grad in gradients(sae).items():
            torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-10, atol=1e-12, msg=f"{name} ({mode})")


def test_aux_k_loss_is_zero_without_dead_latents():
    sae, x = make_sae("topk"), data()
    out = steps.forward_backward(sae, x, dead=torch.zeros(D_SAE, dtype=torch.bool), aux_coefficient=1.0)
    assert float(out.aux) == 0.0


# --- BatchTopK's threshold, the decoder, the schedules -----------------------------------------------------------------


def test_batchtopk_threshold_follows_the_smallest_kept_activation():
    sae = make_sae("batchtopk")
    losses.update_batchtopk_threshold(sae, torch.tensor([[0.0, 0.5, 2.0], [0.3, 0.0, 0.0]], dtype=torch.float64), 1.0)
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.3, dtype=torch.float64))
    losses.update_batchtopk_threshold(sae, torch.tensor([0.0, 0.8, 1.1], dtype=torch.float64), rate=0.1)
    expected = torch.full((D_SAE,), 0.9 * 0.3 + 0.1 * 0.8, dtype=torch.float64)
    torch.testing.assert_close(sae.threshold.detach(), expected)
    losses.update_batchtopk_threshold(sae, torch.zeros(3, 3, dtype=torch.float64), rate=0.1)  # nothing kept: no change
    torch.testing.assert_close(sae.threshold.detach(), expected)
    sae.eval()  # in eval mode the SAE is the JumpReLU SAE with that threshold
    x = data()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), torch.where(pre > 0.35, pre, torch.zeros_like(pre)).detach())


def test_the_trainer_averages_the_first_thresholds_then_moves_by_the_rate():
    sae, x = make_sae("batchtopk"), data()
    trainer = Trainer(sae, 400, lr=1e-9, threshold_rate=0.25)  # lr ~ 0: the same smallest kept activation each step
    sae.train()
    minima = []
    for scale in (1.0, 2.0, 0.5, 3.0, 1.5):
        acts = sae.encode_with_pre(x * scale)[0].detach()
        minima.append(float(acts[acts > 0].min()))
        trainer.step(x * scale)
    expected = sum(minima[:4]) / 4  # a running mean while 1 / (steps so far) ≥ rate
    expected = 0.75 * expected + 0.25 * minima[4]
    assert float(sae.threshold[0].detach()) == pytest.approx(expected, rel=1e-6)


def test_a_trainer_step_updates_the_batchtopk_threshold_from_the_kept_activations():
    sae, x = make_sae("batchtopk"), data()
    sae.train()
    kept = sae.encode_with_pre(x)[0]
    smallest = float(kept[kept > 0].min().detach())
    Trainer(sae, 10, lr=1e-3).step(x)
    torch.testing.assert_close(sae.threshold.detach(), torch.full((D_SAE,), smallest, dtype=torch.float64))


def test_parallel_gradient_removal_and_unit_norm_decoder():
    sae = make_sae("topk")
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    grad = torch.randn(D_SAE, D_IN, dtype=torch.float64)
    sae.W_dec.grad = grad.clone()
    losses.remove_parallel_gradient(sae)
    rows = sae.W_dec.detach()
    expected = grad - (grad * rows).sum(-1, keepdim=True) * rows  # each row's gradient minus its projection on the row
    torch.testing.assert_close(sae.W_dec.grad, expected)
    assert (sae.W_dec.grad * rows).sum(-1).abs().max() < 1e-12
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=torch.float64) + 0.5)
    before = sae.W_dec.detach().clone()
    losses.renormalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.detach(), before / before.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("unit_norm", [True, False])
def test_trainer_keeps_decoder_rows_at_unit_norm_when_asked(unit_norm):
    sae, x = make_sae("standard"), data()
    trainer = Trainer(sae, 10, lr=0.05, l1_coefficient=0.5, unit_norm_decoder=unit_norm)
    for _ in range(3):
        trainer.step(x)
    norms = sae.W_dec.detach().norm(dim=-1)
    if unit_norm:
        torch.testing.assert_close(norms, torch.ones(D_SAE, dtype=torch.float64))
    else:
        assert (norms - 1).abs().max() > 0.01


def test_jumprelu_thresholds_never_go_below_zero():
    sae, x = make_sae("jumprelu"), data()
    with torch.no_grad():
        sae.threshold.fill_(0.01)
    trainer = Trainer(sae, 10, lr=0.5, l0_coefficient=0.0)  # big steps: the MSE term pushes thresholds down
    for _ in range(3):
        trainer.step(x)
    assert sae.threshold.min() >= 0 and (sae.threshold == 0).any()


def test_learning_rate_and_coefficient_schedules():
    sae = make_sae("standard")
    trainer = Trainer(sae, 100, lr=1.0, lr_warmup_steps=10, lr_decay_steps=20, l1_coefficient=2.0,
                      sparsity_warmup_steps=5)
    assert [trainer.lr_at(s) for s in (0, 4, 9, 10, 79)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [trainer.lr_at(s) for s in (80, 90, 99)] == [1.0, 0.5, pytest.approx(0.05)]
    assert [trainer.coefficient_at(s) for s in (0, 4, 5, 50)] == [0.4, 2.0, 2.0, 2.0]
    cosine = Trainer(sae, 100, lr=1.0, lr_warmup_steps=0, lr_schedule="cosine")
    assert cosine.lr_at(0) == 1.0
    assert cosine.lr_at(50) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.5)))
    assert cosine.lr_at(99) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.01)))
    assert Trainer(sae, 100, lr=1.0, lr_schedule="constant").lr_at(99) == 1.0


def test_dead_latents_are_those_silent_for_dead_after_tokens():
    sae, x = make_sae("standard"), data()
    with torch.no_grad():
        sae.b_enc[:5] = -1e3  # these five never fire
    trainer = Trainer(sae, 10, lr=1e-6, dead_after_tokens=2 * TOKENS)
    trainer.step(x)
    assert not trainer.dead.any()  # too early: nothing has been silent for dead_after_tokens yet
    trainer.step(x)
    assert trainer.dead[:5].all()
    assert trainer.since_fired[:5].tolist() == [2 * TOKENS] * 5


def test_a_standard_sae_step_turns_sparse_once_few_latents_fire(monkeypatch):
    sae, x = make_sae("standard"), data()
    with torch.no_grad():
        sae.b_enc.fill_(-6.0)  # few pre-activations positive
    calls = []
    forward_backward = steps.forward_backward
    monkeypatch.setattr("neuronmap.sae.training.forward_backward",
                        lambda *a, **kw: calls.append(kw["sparse"]) or forward_backward(*a, **kw))
    trainer = Trainer(sae, 10, lr=1e-6, l1_coefficient=0.1)
    trainer.step(x)
    trainer.step(x)
    assert trainer.density < 0.05 and calls == [False, True]


def test_geometric_median_minimises_the_summed_distance():
    line = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [7, 0, 0], [30, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0, 0, 0], dtype=torch.float64), atol=1e-4, rtol=0)
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 3
    median = geometric_median(points)
    unit = (points - median) / (points - median).norm(dim=-1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3 * len(points)  # the optimality condition: the unit vectors balance
    objective = lambda m: (points - m).norm(dim=-1).sum()  # noqa: E731
    assert objective(median) < objective(points.mean(0))
