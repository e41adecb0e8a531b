"""`CircuitGraph`: edge scores over a model's computational graph, normalised as patching results are."""

from __future__ import annotations

import json
import torch

from ..display import Renders, html_table
from .graph import Graph

SCHEMA = "neuronmap.circuit_graph/1"


class CircuitGraph(Renders):
    """Scores for the edges of `graph`: `.scores` `[sender, receiver]` (`[position, sender, receiver]` when the
    graph keeps positions), normalised so that an edge whose patch would move the metric from the corrupted run
    all the way to the clean one scores 1; `.raw` keeps the metric's own units. Zero where there is no edge.
    """

    def __init__(self, graph: Graph, raw: torch.Tensor, clean: float, corrupt: float, *, method: str, metric: str,
                 labels: list[str] | None = None):
        self.graph, self.raw = graph, raw
        self.clean, self.corrupt = clean, corrupt
        self.method, self.metric = method, metric
        self.labels = labels
        self.scores = raw / (clean - corrupt)

    def __repr__(self) -> str:
        return (
            f"CircuitGraph({self.method} on {self.graph.model_name!r}, {self.graph.n_edges:,} edges, {self.metric}: "
            f"clean {self.clean:.4g}, corrupted {self.corrupt:.4g})"
        )

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` edges with the largest |score|, largest first, as ("sender->receiver", score); with positions
        kept, the edge's name ends with "@position"."""
        flat = self.scores.flatten()
        strength = self.scores.abs().masked_fill(~self.graph.valid, -1).flatten()
        order = strength.argsort(descending=True)[: min(k, self.graph.n_edges)]
        return [(self._edge_name(i), float(flat[i])) for i in order.tolist()]

    def _edge_name(self, flat_index: int) -> str:
        n_senders, n_receivers = len(self.graph.senders), len(self.graph.receivers)
        position, rest = divmod(flat_index, n_senders * n_receivers)
        sender, receiver = divmod(rest, n_receivers)
        name = f"{self.graph.senders[sender].name}->{self.graph.receivers[receiver].name}"
        return name if self.graph.positions is None else f"{name}@{position}"

    def to_json(self) -> str:
        """The graph and its scores as JSON (schema "neuronmap.circuit_graph/1": the graph's shape, the method, the
        metric's clean and corrupted values, the token labels, and every edge's raw score)."""
        g = self.graph
        positions = self.raw if g.positions is not None else self.raw[None]
        edges = g.valid.nonzero().tolist()
        return json.dumps({
            "schema": SCHEMA,
            "graph": {"model": g.model_name, "n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
                      "qkv": g.qkv, "parallel": g.parallel, "positions": g.positions},
            "method": self.method, "metric": self.metric, "clean": self.clean, "corrupt": self.corrupt,
            "labels": self.labels,
            "edges": [g.senders[s].name + "->" + g.receivers[r].name for s, r in edges],
            "raw": [[float(scores[s, r]) for s, r in edges] for scores in positions],
        })

    @classmethod
    def from_json(cls, text: str) -> CircuitGraph:
        """A `CircuitGraph` from `to_json`'s text."""
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            from ..errors import InputError

            raise InputError(f"not a NeuronMap circuit graph (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        shape = data["graph"]
        graph = Graph(shape["n_layers"], shape["n_heads"], n_kv_heads=shape["n_kv_heads"], qkv=shape["qkv"],
                      parallel=shape["parallel"], positions=shape["positions"], model_name=shape["model"])
        edges = graph.valid.nonzero()
        raw = torch.zeros(len(data["raw"]), *graph.valid.shape)
        raw[:, edges[:, 0], edges[:, 1]] = torch.tensor(data["raw"], dtype=raw.dtype)
        raw = raw if graph.positions is not None else raw[0]
        return cls(graph, raw, data["clean"], data["corrupt"], method=data["method"], metric=data["metric"],
                   labels=data["labels"])

    def _repr_html_(self) -> str:
        rows = [(name, f"{score:+.3f}") for name, score in self.top(20)]
        caption = f"{self.method} · {self.metric} · {self.graph.model_name}: the 20 strongest of {self.graph.n_edges:,} edges"
        return html_table(caption, ["edge", "score (1 = clean − corrupted)"], rows, numeric=[1])
