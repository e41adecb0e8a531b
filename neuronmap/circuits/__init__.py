"""Circuits: attribution patching of a sweep's cells (`atp`, with `recheck` of its strongest cells exactly), a
model's computational graph (`graph`), edge attribution patching on it (`eap`: EAP and EAP-IG)
returning a `CircuitGraph`, exact edge patching of circuits (`circuit_metrics`), and choosing circuits and
measuring their faithfulness (`CircuitGraph.select`, `.faithfulness`)."""

from .atp import atp, recheck
from .attribution import eap, edge_scores
from .discovery import faithfulness, prune, random_circuits, strongest
from .exact import circuit_metrics
from .graph import Graph, Node, Receiver, graph
from .result import CircuitGraph, FaithfulnessCurve

__all__ = [
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
    "prune",
    "random_circuits",
    "recheck",
    "strongest",
]
