"""What defines a sparse autoencoder: its architecture, widths, the hook it reads, and SAELens's encode conventions."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from ..errors import SAEError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass
class SAEConfig:
    """An SAE's shape and conventions, with SAELens's field names so its `cfg.json` maps onto it one to one.

    `architecture`: `"standard"` (ReLU), `"topk"` (the k largest pre-activations per token), `"batchtopk"` (the
    k × batch largest over a batch while training, a learned threshold at inference) or `"jumprelu"` (a threshold
    per latent). `apply_b_dec_to_input`: subtract `b_dec` before encoding. `normalize_activations`: SAELens's
    run-time normalisation of the input (`"constant_norm_rescale"` scales each input to norm √d_in, `"layer_norm"`
    standardises it; the reconstruction is scaled back; `"expected_average_only_in"` means a scale already folded into
    the weights). `rescale_acts_by_decoder_norm` (TopK): rank and decode latents as if decoder rows had unit norm.
    `reshape_activations="hook_z"` flattens `[..., head, d_head]` inputs. `metadata` keeps everything else (model,
    dataset, context size, training numbers) as written.
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"
    dtype: str = "float32"
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("normalize_activations", self.normalize_activations, NORMALIZATIONS)
        _choice("reshape_activations", self.reshape_activations, ("none", "hook_z"))
        _choice("dtype", self.dtype, DTYPES)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SAEError(f"SAE {name} must be a positive int, got {value!r}")
        if self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= self.d_sae:
                raise SAEError(f"a {self.architecture} SAE needs k between 1 and d_sae={self.d_sae}, got k={self.k!r}")
        else:
            if self.k is not None:
                raise SAEError(f"k only applies to topk and batchtopk SAEs, not {self.architecture!r}")
            if self.rescale_acts_by_decoder_norm:
                raise SAEError(f"rescale_acts_by_decoder_norm only applies to topk and batchtopk SAEs, not {self.architecture!r}")

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SAEError(f"SAE {name} {value!r} is not one of {', '.join(map(repr, valid))}{hint}")
