"""Representation analysis: what layers represent and how they compare, on captures, tensors and activation stores.

`activations.as_matrix` turns a `Trace` (with a hook name), a tensor or an activation store into the `[samples,
features]` matrix every analysis reads.
"""

from .activations import as_matrix

__all__ = ["as_matrix"]
