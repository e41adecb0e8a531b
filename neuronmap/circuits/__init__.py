"""Circuits: attribution patching of a sweep's cells (`atp`, with `recheck` of its strongest cells exactly), a
model's computational graph (`graph`), edge attribution patching on it (`eap`: EAP and EAP-IG)
from corrupted prompts or a `mean_ablation` / `resample_ablation`, returning a `CircuitGraph`, exact edge patching of circuits (`circuit_metrics`), and choosing circuits and
measuring their faithfulness (`CircuitGraph.select`, `.faithfulness`); and circuit-tracer's attribution graphs read from
its JSON and drawn offline (`read_attribution_graph`, returning an `AttributionGraph`)."""

from .ablation import mean_ablation, resample_ablation
from .atp import atp, recheck
from .attribution import eap, edge_scores
from .discovery import faithfulness, greedy, prune, random_circuits, strongest
from .exact import circuit_metrics
from .graph import Graph, Node, Receiver, graph
from .result import CircuitGraph, FaithfulnessCurve
from .tracer import AttributionGraph, read_attribution_graph

__all__ = [
    "AttributionGraph",
    "CircuitGraph",
    "FaithfulnessCurve",
    "Graph",
    "Node",
    "Receiver",
    "atp",
    "circuit_metrics",
    "eap",
    "edge_scores",
    "faithfulness",
    "graph",
    "greedy",
    "mean_ablation",
    "prune",
    "random_circuits",
    "read_attribution_graph",
    "recheck",
    "resample_ablation",
    "strongest",
]
