"""Sparse autoencoders: the SAE (ReLU, TopK, BatchTopK, JumpReLU), training, metrics, SAELens's files, splicing into
a model, and feature dashboards.

`SAE` encodes and decodes with SAELens's conventions (`SAE.load`/`save` read and write its folders); `train` fits
one from a model's hook or an activation store; `evaluate` measures it (`SAEMetrics`); `model.run(..., saes=[sae])`
and `model.spliced(sae)` put it in the forward pass, its insides reachable as `<hook>.hook_sae_acts_post` and the
other `hook_sae_*` points; `feature_statistics` gathers every latent's statistics in one pass, shown by
`.dashboard(latent)` (`FeatureDashboard`) and `.browser()` (`FeatureBrowser`).
"""

from .autoencoder import SAE
from .config import ARCHITECTURES, SAEConfig
from .dashboard import FeatureBrowser, FeatureDashboard
from .features import FeatureStatistics, feature_statistics
from .history import TrainingLog
from .metrics import SAEMetrics, evaluate
from .training import Trainer, train

__all__ = [
    "ARCHITECTURES",
    "FeatureBrowser",
    "FeatureDashboard",
    "FeatureStatistics",
    "SAE",
    "SAEConfig",
    "SAEMetrics",
    "Trainer",
    "TrainingLog",
    "evaluate",
    "feature_statistics",
    "train",
]
