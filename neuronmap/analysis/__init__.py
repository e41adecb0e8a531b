"""Representation analysis: what layers represent and how they compare, on captures, tensors and activation stores.

`as_matrix` turns a `Trace` (with a hook name), a tensor or an activation store into the `[samples, features]` matrix
every analysis reads. `logit_lens` reads every layer's residual stream through the final norm and unembedding
(`LogitLens`); `direct_logit_attribution` splits a logit (or logit difference) into each head's, MLP's and bias's
direct contribution, the final norm's scale frozen from the clean run (`LogitAttribution`).
"""

from .activations import as_matrix
from .attribution import LogitAttribution, direct_logit_attribution
from .lenses import LogitLens, logit_lens

__all__ = ["LogitAttribution", "LogitLens", "as_matrix", "direct_logit_attribution", "logit_lens"]
