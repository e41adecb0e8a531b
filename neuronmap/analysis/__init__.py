"""Representation analysis: what layers represent and how they compare, on captures, tensors and activation stores.

`as_matrix` turns a `Trace` (with a hook name), a tensor or an activation store into the `[samples, features]` matrix
every analysis reads. Similarity of two activation sets over the same inputs: `cka` (linear or RBF, debiased),
`minibatch_cka` (streams a store), `rdm` and `rsa` (with a permutation test), `cca`, `svcca`, `pwcca`, `procrustes`;
`similarity_matrix` and `layer_similarity` compare every pair (`SimilarityMatrix`). `logit_lens` reads every layer's
residual stream through the final norm and unembedding (`LogitLens`); `direct_logit_attribution` splits a logit (or
logit difference) into each head's, MLP's and bias's direct contribution, the final norm's scale frozen from the clean
run (`LogitAttribution`).
"""

from .activations import as_matrix
from .attribution import LogitAttribution, direct_logit_attribution
from .lenses import LogitLens, logit_lens
from .similarity import (
    RSAResult,
    cca,
    cka,
    layer_similarity,
    minibatch_cka,
    procrustes,
    pwcca,
    rdm,
    rsa,
    similarity_matrix,
    svcca,
)
from .similarity_view import SimilarityMatrix

__all__ = [
    "LogitAttribution",
    "LogitLens",
    "RSAResult",
    "SimilarityMatrix",
    "as_matrix",
    "cca",
    "cka",
    "direct_logit_attribution",
    "layer_similarity",
    "logit_lens",
    "minibatch_cka",
    "procrustes",
    "pwcca",
    "rdm",
    "rsa",
    "similarity_matrix",
    "svcca",
]
