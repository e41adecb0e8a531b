"""Representation analysis: what layers represent and how they compare, on captures, tensors and activation stores.

Every analysis reads a `Trace` (with a hook name), a tensor or an activation store through `as_matrix` (one row per
real token); those in `STREAMING_METHODS` read a store block by block, whatever its size. Each returns a result that
renders (one-line repr, bounded HTML, `.figure()`, `.to_numpy()`).

* Statistics: `neuron_statistics`, `layer_summary`, `cross_layer_correlation`, `neuron_correlation`.
* Projections and clustering: `pca` (streams a store), `tsne`, `umap`, `effective_dimensionality`; `kmeans`,
  `dbscan`, `agglomerative`.
* Similarity over the same inputs: `cka`, `minibatch_cka`, `rdm`, `rsa`, `cca`, `svcca`, `pwcca`, `procrustes`,
  `similarity_matrix`, `layer_similarity` (`SimilarityMatrix`).
* Probes and concepts: `probe`, `probe_by_layer`; `cav`, `concept_activation_vector`, `tcav`, concept algebra and
  steering on `ConceptDirection`.
* Lenses and attribution: `logit_lens`, `train_tuned_lens` / `tuned_lens` / `lens_kl`, `direct_logit_attribution`.
* Information and rigour: `neuron_entropy`, `mutual_information`; `bootstrap` (a confidence interval for any scalar
  above), `correct_pvalues` and `significant` (Bonferroni, Holm, Benjamini–Hochberg).
"""

from .activations import STREAMING_METHODS, as_matrix, row_tokens, token_contexts
from .attribution import LogitAttribution, direct_logit_attribution
from .cluster_view import Clusters
from .clustering import agglomerative, dbscan, kmeans
from .concept_view import ConceptDirection, TCAVResult
from .concepts import cav, concept_activation_vector, directional_derivatives, tcav
from .information import InformationResult, mutual_information, neuron_entropy
from .lenses import LogitLens, logit_lens
from .probe_view import ProbeCurve, ProbeResult
from .probes import control_task, probe, probe_by_layer
from .projection_view import Projection
from .projections import effective_dimensionality, pca, tsne, umap
from .rigour import Estimate, bootstrap, correct_pvalues, significant
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
from .statistics import cross_layer_correlation, layer_summary, neuron_correlation, neuron_statistics
from .statistics_view import LayerSummary, NeuronStatistics
from .tuned_lens import LensKL, TunedLens, lens_kl, train_tuned_lens, tuned_lens

__all__ = [
    "STREAMING_METHODS",
    "Clusters",
    "ConceptDirection",
    "Estimate",
    "InformationResult",
    "LayerSummary",
    "LensKL",
    "LogitAttribution",
    "LogitLens",
    "NeuronStatistics",
    "ProbeCurve",
    "ProbeResult",
    "Projection",
    "RSAResult",
    "SimilarityMatrix",
    "TCAVResult",
    "TunedLens",
    "agglomerative",
    "as_matrix",
    "bootstrap",
    "cav",
    "cca",
    "cka",
    "concept_activation_vector",
    "control_task",
    "correct_pvalues",
    "cross_layer_correlation",
    "dbscan",
    "direct_logit_attribution",
    "directional_derivatives",
    "effective_dimensionality",
    "kmeans",
    "layer_similarity",
    "layer_summary",
    "lens_kl",
    "logit_lens",
    "minibatch_cka",
    "mutual_information",
    "neuron_correlation",
    "neuron_entropy",
    "neuron_statistics",
    "pca",
    "probe",
    "probe_by_layer",
    "procrustes",
    "pwcca",
    "rdm",
    "row_tokens",
    "rsa",
    "significant",
    "similarity_matrix",
    "svcca",
    "tcav",
    "token_contexts",
    "train_tuned_lens",
    "tsne",
    "tuned_lens",
    "umap",
]
