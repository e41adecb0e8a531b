"""NeuronMap: capture, patch and look inside transformer models, in notebooks.

The public API is re-exported here; everything else is private to its module. Heavy optional libraries
(plotly, scikit-learn, h5py, anywidget) are imported where they are first used, so `import neuronmap` stays light.
"""

from . import analysis, circuits, patching, sae, store, zoo
from .attention import SCORES, AttentionPatterns, AttentionView, HeadScores, attention, head_scores, repeated_random_tokens
from .circuits import CircuitGraph
from .errors import (
    HookNameError,
    InputError,
    InterventionError,
    LoadError,
    NeuronMapError,
    NotCapturedError,
    SAEError,
    StoreError,
    TunedLensError,
    WeightError,
)
from .hooks import HookPoint
from .model import Model, load
from .patching import PatchingResult, patch
from .sae import SAE
from .trace import Trace
from .weights import Weights

__version__ = "0.1.0"


def __getattr__(name: str):
    """The activation store's entry points, loaded (with h5py) on first use."""
    if name in ("ActivationStore", "extract", "open_store"):
        return getattr(store, name)
    raise AttributeError(f"module 'neuronmap' has no attribute {name!r}")

__all__ = [
    "SCORES",
    "analysis",
    "ActivationStore",
    "AttentionPatterns",
    "AttentionView",
    "CircuitGraph",
    "HeadScores",
    "HookNameError",
    "HookPoint",
    "InputError",
    "InterventionError",
    "LoadError",
    "Model",
    "NeuronMapError",
    "NotCapturedError",
    "StoreError",
    "PatchingResult",
    "SAE",
    "SAEError",
    "Trace",
    "TunedLensError",
    "WeightError",
    "Weights",
    "attention",
    "circuits",
    "extract",
    "head_scores",
    "load",
    "open_store",
    "patch",
    "patching",
    "repeated_random_tokens",
    "sae",
    "store",
    "zoo",
]
