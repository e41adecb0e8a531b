"""Activation patching: sweeps over layers, positions and heads (`patch`), their metrics, and `PatchingResult`.

`patch(model, clean, corrupt, metric, what=..., by=...)` asks which component carries a behaviour: it puts each
component's clean activation into the corrupted run (or the reverse) and measures the metric, computing only
the work each patch changes (see `engine`). `path_patch` measures senders' effects through the direct path only; `causal_trace` is ROME's causal tracing. `ablate` (zero, mean, resample) and `steer` return interventions
for `model.run`, `model.hooks` and `model.generate`.
"""

from .ablation import ablate
from .causal import CausalTrace, causal_trace
from .cells import BY, COMPONENTS
from .metrics import Metric, kl, logit_diff, logprob, loss, prob
from .path import path_patch
from .result import PatchingResult
from .steering import steer, steering_vector
from .sweep import patch

__all__ = [
    "BY",
    "COMPONENTS",
    "CausalTrace",
    "Metric",
    "PatchingResult",
    "ablate",
    "causal_trace",
    "kl",
    "logit_diff",
    "logprob",
    "loss",
    "patch",
    "path_patch",
    "prob",
    "steer",
    "steering_vector",
]
