"""Circuits: a model's computational graph (`graph`) and edge attribution patching on it (`eap`: EAP and EAP-IG),
returning a `CircuitGraph`."""

from .attribution import eap, edge_scores
from .graph import Graph, Node, Receiver, graph
from .result import CircuitGraph

__all__ = ["CircuitGraph", "Graph", "Node", "Receiver", "eap", "edge_scores", "graph"]
