"""Sparse autoencoders: the SAE (ReLU, TopK, BatchTopK, JumpReLU), SAELens's files, splicing into a model.

`SAE` encodes and decodes with SAELens's conventions; `model.run(..., saes=[sae])` and `model.spliced(sae)` put it
in the forward pass, its insides reachable as `<hook>.hook_sae_acts_post` and friends.
"""

from .autoencoder import SAE
from .config import ARCHITECTURES, SAEConfig
from .metrics import SAEMetrics, evaluate
from .training import train

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "SAEMetrics", "evaluate", "train"]
