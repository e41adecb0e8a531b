"""The sparse autoencoder: encode an activation into sparse latents and decode it back, with TransformerLens-style
hook points (`hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`, `hook_sae_error`,
`hook_sae_output`) on identity modules, so capture and interventions reach its insides like any model's.

The arithmetic follows SAELens's inference SAEs exactly (`b_dec` subtracted before encoding when
`apply_b_dec_to_input`, its run-time normalisations, TopK's decoder-norm rescaling), so an SAE loaded from SAELens
files encodes and decodes as SAELens does. An SAE starts in eval mode; training switches it to train mode, where
BatchTopK ranks across the batch and JumpReLU's threshold gets the paper's pseudo-gradient.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SAEError
from ..hooks import HookPoint
from . import activations
from .config import SAEConfig

if TYPE_CHECKING:
    from .history import TrainingLog

HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")


class _Hook(nn.Identity):
    """A named place in the SAE's forward pass that NeuronMap's hooks attach to (costs nothing when unhooked)."""


class SAE(nn.Module):
    """A sparse autoencoder `d_in → d_sae → d_in` (`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, as SAELens stores them).

    Build one with `SAE("topk", d_in=64, d_sae=512, k=16, hook_name="blocks.1.hook_resid_post")` (any `SAEConfig`
    field), load one with `SAE.load(folder)` (SAELens's files), splice it into a model with
    `model.run(..., saes=[sae])` or `with model.spliced(sae): ...`. `training_log` holds the curves of the run that
    trained it (`nm.sae.train`), None otherwise.
    """

    training_log: TrainingLog | None = None

    def __init__(self, architecture: str | SAEConfig, d_in: int | None = None, d_sae: int | None = None, *,
                 seed: int | None = None, **fields: Any):
        super().__init__()
        cfg = architecture if isinstance(architecture, SAEConfig) else SAEConfig(architecture, d_in, d_sae, **fields)
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        if cfg.architecture in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.bandwidth = 0.001
        for name in HOOKS:
            setattr(self, name, _Hook())
        self._norm_state: tuple[torch.Tensor, ...] | None = None
        self.initialize(seed)
        self.eval()

    # --- construction and files -------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, seed: int | None = None) -> SAE:
        """Decoder rows random with unit norm, encoder its transpose, biases zero (JumpReLU thresholds 0.001)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float64)
        W = W / W.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.architecture == "jumprelu":
            self.threshold.fill_(0.001)
        elif self.cfg.architecture == "batchtopk":
            self.threshold.zero_()
        return self

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> SAE:
        """An SAE from a folder SAELens wrote (`cfg.json` + `sae_weights.safetensors`), or one `save` wrote."""
        from .saelens import load_sae

        return load_sae(path, device=device)

    def save(self, path: str | Path) -> Path:
        """Write SAELens's folder format (`cfg.json` + `sae_weights.safetensors`) that SAELens's `SAE.load_from_disk` reads."""
        from .saelens import save_sae

        return save_sae(self, path)

    # --- the forward pass ---------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations `[..., d_sae]` of inputs `[..., d_in]` (a later `decode` undoes the input's normalisation)."""
        acts, _, state = self._encode(x)
        self._norm_state = state
        return acts

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction `[..., d_in]` of latent activations (scaled back as the last `encode` normalised)."""
        return self._decode(acts, self._norm_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x` (through every hook point but the error term)."""
        acts, _, state = self._encode(x)
        return self.hook_sae_output(self._decode(acts, state))

    def encode_with_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, pre-activations) of `x`: what training losses need (pre-activations for L1/L0 and aux-k)."""
        acts, pre, state = self._encode(x)
        self._norm_state = state
        return acts, pre

    def splice(self, activation: torch.Tensor, use_error_term: bool = False) -> torch.Tensor:
        """What a model's hook point passes on when this SAE sits there: the reconstruction, or with `use_error_term`
        the reconstruction plus the error `x − clean reconstruction` (the original activation, bit for bit, unless
        something edits the latents or the error; gradients then flow through the SAE as in SAELens)."""
        x = self._flatten_input(activation)
        sae_x = x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)
        acts, _, state = self._encode(sae_x)
        recons = self._decode(acts, state)
        if use_error_term:
            if _has_hooks(self, ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")):
                with torch.no_grad():
                    clean_acts, _, clean_state = self._encode(sae_x, hooked=False)
                    clean = self._decode(clean_acts, clean_state, hooked=False)
            else:
                clean = recons
            error = (sae_x - clean).detach()
            edited_error = self.hook_sae_error(error)
            if edited_error is error and (recons is clean or torch.equal(recons, clean)):
                # the input exactly (x + 0), while the gradient flows into recons + error as SAELens's does
                out = sae_x.detach() + ((recons + error) - (recons + error).detach())
            else:
                out = recons + edited_error
        else:
            out = recons
        out = self.hook_sae_output(out)
        return out.to(dtype=activation.dtype, device=activation.device).reshape(activation.shape)

    def hook_points(self, prefix: str, pos_dim: int = 1) -> list[HookPoint]:
        """The SAE's hook points named `<prefix>.hook_sae_*` (as SAELens names them on a HookedSAETransformer)."""
        return [HookPoint(f"{prefix}.{name}", getattr(self, name), pos_dim=pos_dim) for name in HOOKS]

    # --- decoder norms ------------------------------------------------------------------------------------------

    @property
    def W_dec_norm(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm, moving the scale into the encoder so reconstructions do not change."""
        norm = self.W_dec_norm.clamp_min(1e-12)
        self.W_dec.div_(norm[:, None])
        self.W_enc.mul_(norm)
        self.b_enc.mul_(norm)
        if hasattr(self, "threshold") and not self.cfg.rescale_acts_by_decoder_norm:
            self.threshold.mul_(norm)  # (rescaled pre-activations, and so their threshold, do not change)

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        hook = f", hook {cfg.hook_name!r}" if cfg.hook_name else ""
        return f"{cfg.architecture}, {cfg.d_in} → {cfg.d_sae}{k}{hook}"

    def __repr__(self) -> str:
        return f"SAE({self.extra_repr()})"

    # --- internals ----------------------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor, hooked: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        hook = _hooks_of(self, hooked)
        x = hook("hook_sae_input", self._flatten_input(x).to(self.W_enc.dtype))
        x, state = self._normalize_in(x)
        sae_in = x - self.b_dec * self.cfg.apply_b_dec_to_input
        pre = hook("hook_sae_acts_pre", sae_in @ self.W_enc + self.b_enc)
        return hook("hook_sae_acts_post", self._activate(pre)), pre, state

    def _decode(self, acts: torch.Tensor, state: tuple | None, hooked: bool = True) -> torch.Tensor:
        if acts.shape[-1] != self.cfg.d_sae:
            raise SAEError(f"latent activations have {acts.shape[-1]} features but this SAE has d_sae={self.cfg.d_sae}")
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec_norm
        recons = _hooks_of(self, hooked)("hook_sae_recons", acts @ self.W_dec + self.b_dec)
        return self._normalize_out(recons, state)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.architecture == "standard":
            return activations.relu(pre)
        if cfg.architecture == "jumprelu":
            if self.training:
                return activations.JumpReLU.apply(pre, self.threshold, self.bandwidth)
            return activations.jumprelu(pre, self.threshold)
        if cfg.rescale_acts_by_decoder_norm:  # (BatchTopK's threshold is in these rescaled units too)
            pre = pre * self.W_dec_norm
        if cfg.architecture == "topk":
            return activations.topk(pre, cfg.k)
        if self.training:
            return activations.batch_topk(pre, cfg.k)
        return activations.jumprelu(pre, self.threshold)

    def _flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        d_in = self.cfg.d_in
        if x.shape[-1] == d_in:
            return x
        if x.dim() >= 2 and x.shape[-2] * x.shape[-1] == d_in and self.cfg.reshape_activations == "hook_z":
            return x.flatten(-2)
        name = f" on {self.cfg.hook_name!r}" if self.cfg.hook_name else ""
        raise SAEError(
            f"this SAE{name} reads d_in={d_in} features but the activation has shape {list(x.shape)} "
            f"(last dimension {x.shape[-1]})"
        )

    def _normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        how = self.cfg.normalize_activations
        if how == "constant_norm_rescale":
            coeff = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff,)
        if how == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _normalize_out(self, x: torch.Tensor, state: tuple | None) -> torch.Tensor:
        how = self.cfg.normalize_activations
        if state is None or how not in ("constant_norm_rescale", "layer_norm"):
            return x
        if how == "constant_norm_rescale":
            return x / state[0]
        mu, std = state
        return x * std + mu


def _hooks_of(sae: SAE, hooked: bool):
    if hooked:
        return lambda name, value: getattr(sae, name)(value)
    return lambda name, value: value


def _has_hooks(sae: SAE, names: tuple[str, ...]) -> bool:
    return any(getattr(sae, name)._forward_hooks for name in names)
