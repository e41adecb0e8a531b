"""NeuronMap: capture, patch and look inside transformer models, in notebooks.

The public API is re-exported here; everything else is private to its module. Heavy optional libraries
(plotly, scikit-learn, h5py, anywidget) are imported where they are first used, so `import neuronmap` stays light.
"""

from . import circuits, patching, zoo
from .attention import SCORES, AttentionPatterns, AttentionView, HeadScores, attention, head_scores, repeated_random_tokens
from .circuits import CircuitGraph
from .errors import HookNameError, InputError, InterventionError, LoadError, NeuronMapError, NotCapturedError, WeightError
from .hooks import HookPoint
from .model import Model, load
from .patching import PatchingResult, patch
from .trace import Trace
from .weights import Weights

__version__ = "0.1.0"

__all__ = [
    "SCORES",
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
    "PatchingResult",
    "Trace",
    "WeightError",
    "Weights",
    "attention",
    "circuits",
    "head_scores",
    "load",
    "patch",
    "patching",
    "repeated_random_tokens",
    "zoo",
]
