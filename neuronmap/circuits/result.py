"""`CircuitGraph`: edge scores over a model's computational graph, normalised as patching results are."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..display import Renders, escape, html_table
from ..errors import InputError
from ..graph_widget import ATTENTION_BUDGET, GraphView
from ..graphview import Edge, Node as ViewNode
from ..inputs import Batch
from .discovery import faithfulness, greedy as grow, greedy_order, prune, random_circuits, strongest
from .exact import MEMORY_BUDGET
from .graph import Graph

SCHEMA = "neuronmap.circuit_graph/1"


class CircuitGraph(Renders):
    """Scores for the edges of `graph`: `.scores` `[sender, receiver]` (`[position, sender, receiver]` when the
    graph keeps positions), normalised so that an edge whose patch would move the metric from the corrupted run
    all the way to the clean one scores 1; `.raw` keeps the metric's own units. Zero where there is no edge.
    """

    circuit: torch.Tensor | None = None
    """The chosen circuit (a mask over the edges) once `select` has chosen one."""
    circuit_faithfulness: float | None = None
    """The chosen circuit's faithfulness (0 = corrupted run, 1 = clean run), measured by exact patching."""
    curve: FaithfulnessCurve | None = None
    """The faithfulness of circuits of growing size, once `faithfulness` has measured it."""
    _attention = None  # the clean prompts' attention patterns, once a view has needed them

    def __init__(self, graph: Graph, raw: torch.Tensor, clean: float, corrupt: float, *, method: str, metric: str,
                 labels: list[str] | None = None, source: tuple | None = None):
        self.graph, self.raw = graph, raw
        self.clean, self.corrupt = clean, corrupt
        self.method, self.metric = method, metric
        self.labels = labels
        self.scores = raw / (clean - corrupt)
        self._source = source  # (model, clean, corrupt, metric): what exact patching reruns

    def select(self, *, k: int | None = None, threshold: float | None = None, greedy: bool = False,
               pruned: bool = True) -> CircuitGraph:
        """This graph with `.circuit` set to the `k` strongest edges (or those with |score| >= `threshold`), or with
        `greedy` to `k` edges grown from the logits (each the strongest edge into a node already in the circuit);
        without the edges on no path from the embeddings to the logits unless `pruned=False`. Its faithfulness is
        measured by exact patching (`.circuit_faithfulness`)."""
        self._merged_positions("select a circuit")
        if greedy and (k is None or threshold is not None):
            raise InputError("a greedy circuit grows edge by edge to k edges: give k (and no threshold)")
        mask = grow(self.graph, self.scores, k) if greedy else strongest(self.graph, self.scores, k=k, threshold=threshold)
        chosen = copy.copy(self)
        chosen.circuit = prune(self.graph, mask) if pruned else mask
        if not chosen.circuit.any():
            raise InputError("the chosen edges are on no path from the embeddings to the logits: choose more of them")
        chosen.circuit_faithfulness = float(self._faithfulness(chosen.circuit[None])[0])
        return chosen

    def faithfulness(self, sizes: Sequence[int] | None = None, *, baseline: bool = True, seed: int = 0,
                     greedy: bool = False, memory_budget: int = MEMORY_BUDGET) -> FaithfulnessCurve:
        """The faithfulness of the circuits of the `sizes` strongest edges (default: 1, 3, 10, 30, ... up to every
        edge; with `greedy`, the circuits grown from the logits as `select(greedy=True)` grows them, unpruned), each
        measured by exact patching, with a circuit of random edges of each size as a baseline (`seed`). All
        circuits share stacked forwards. Kept as `.curve` for the view."""
        self._merged_positions("measure faithfulness")
        n_edges = self.graph.n_edges
        sizes = sorted({min(int(size), n_edges) for size in (sizes or _default_sizes(n_edges))})
        if not sizes or sizes[0] < 1:
            raise InputError(f"circuit sizes must be numbers of edges of at least 1, got {sizes}")
        if greedy:
            order = torch.tensor(greedy_order(self.graph, self.scores, sizes[-1]))
            masks = [torch.zeros_like(self.graph.valid).index_put_(tuple(order[:size].T), torch.tensor(True))
                     for size in sizes]
        else:
            masks = [strongest(self.graph, self.scores, k=size) for size in sizes]
        if baseline:
            masks += list(random_circuits(self.graph, sizes, seed))
        values = self._faithfulness(torch.stack(masks), memory_budget=memory_budget)
        random = values[len(sizes):].tolist() if baseline else None
        method = f"{self.method}, grown greedily" if greedy else self.method
        self.curve = FaithfulnessCurve(sizes, values[: len(sizes)].tolist(), random, method, self.graph.model_name)
        return self.curve

    def figure(self) -> Any:
        """The faithfulness curve as a plotly figure (measured with the default sizes first, if not yet)."""
        return (self.curve or self.faithfulness()).figure()

    def to_networkx(self) -> Any:
        """The graph as a `networkx.MultiDiGraph` (networkx must be installed): nodes named as in `top` with `kind`,
        `layer` and `head`; an edge per sender and receiver input (its key: "q", "k", "v" or "in") with `score`,
        `raw` (summed over positions when kept) and `in_circuit`."""
        try:
            import networkx
        except ImportError as error:
            raise InputError("to_networkx needs networkx (pip install networkx)") from error
        g = self.graph
        scores, raw = (self.scores.sum(0), self.raw.sum(0)) if g.positions is not None else (self.scores, self.raw)
        result = networkx.MultiDiGraph(model=g.model_name, method=self.method, metric=self.metric)
        for node in g.nodes:
            result.add_node(node.name, kind=node.kind, layer=node.layer, head=node.head)
        for s, r in g.valid.nonzero().tolist():
            receiver = g.receivers[r]
            result.add_edge(
                g.senders[s].name, _target(g, receiver), key=receiver.input or "in", score=float(scores[s, r]),
                raw=float(raw[s, r]), in_circuit=bool(self.circuit[s, r]) if self.circuit is not None else None,
            )
        return result

    def _faithfulness(self, masks: torch.Tensor, memory_budget: int = MEMORY_BUDGET) -> torch.Tensor:
        if self._source is None:
            raise InputError("this graph was not scored here (read from JSON): exact patching needs the model and prompts")
        model, clean, corrupt, metric = self._source
        return faithfulness(model, clean, corrupt, metric, self.graph, masks, memory_budget=memory_budget)

    def _merged_positions(self, what: str) -> None:
        if self.graph.positions is not None:
            raise InputError(f"to {what}, score the edges with positions merged (per_position=False)")

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

    def view(self, *, patterns: Any = "auto", budget: int = ATTENTION_BUDGET) -> GraphView:
        """The interactive graph: a top-k slider and a threshold re-filter the edges, scroll zooms, dragging pans,
        hovering tells scores, clicking a node highlights its inputs and outputs, and clicking a head opens its
        attention pattern on the clean prompts. Static HTML everywhere (embedding the first prompt's patterns
        within `budget` characters), a live widget in a kernel (patterns sent when a head is first clicked).

        `patterns`: the `AttentionPatterns` heads open; "auto" computes them from the model and clean prompts this
        graph was scored on (none for a graph read from JSON); None shows none.
        """
        if isinstance(patterns, str) and patterns == "auto":
            return GraphView(self._view_parts(), pattern_source=self._clean_patterns if self._source else None,
                             budget=budget)
        return GraphView(self._view_parts(), patterns=patterns, budget=budget)

    def _clean_patterns(self):
        """The attention patterns of the clean prompts this graph was scored on (computed once)."""
        if self._attention is None:
            from ..attention import attention

            model, clean = self._source[0], self._source[1]
            if isinstance(clean, Batch):
                self._attention = attention(model, clean.tokens, attention_mask=clean.attention_mask)
            else:
                self._attention = attention(model, clean)
        return self._attention

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.view()._repr_mimebundle_()

    def _view_parts(self) -> dict[str, Any]:
        """The layered graph's nodes and edges (the circuit's, once chosen) and its texts, for `graph_html`."""
        g = self.graph
        scores = self.scores.sum(0) if g.positions is not None else self.scores
        shown = self.circuit if self.circuit is not None else g.valid
        edges = [
            Edge(g.senders[s].name, _target(g, g.receivers[r]), float(scores[s, r]), g.receivers[r].input,
                 f"{g.senders[s].name} → {g.receivers[r].name}: {float(scores[s, r]):+.4g}")
            for s, r in shown.nonzero().tolist()
        ]
        notes = ["edge scores: 1 = the whole clean − corrupted difference of the " + self.metric]
        if g.positions is not None:
            notes.append(f"summed over the {g.positions} positions")
        description = f"{self.method} · {self.metric} · clean {self.clean:.4g}, corrupted {self.corrupt:.4g}"
        if self.circuit is not None:
            description += f" · circuit of {int(self.circuit.sum())} edges, faithfulness {self.circuit_faithfulness:.3f}"
        return dict(
            nodes=_view_nodes(g), edges=edges, title=f"circuit graph · {g.model_name}", row_labels=_row_labels(g),
            description=description, note="; ".join(notes), extra=self.curve._repr_html_() if self.curve else "",
        )


class FaithfulnessCurve(Renders):
    """The faithfulness (0 = corrupted run, 1 = clean run) of the circuits of the `sizes` strongest edges, and of
    random circuits of the same sizes (`random`, when measured)."""

    def __init__(self, sizes: list[int], values: list[float], random: list[float] | None, method: str, model_name: str):
        self.sizes, self.values, self.random = sizes, values, random
        self.method, self.model_name = method, model_name

    def __repr__(self) -> str:
        points = ", ".join(f"{size}: {value:.2f}" for size, value in zip(self.sizes, self.values))
        return f"FaithfulnessCurve({self.method} on {self.model_name!r}, edges -> faithfulness {{{points}}})"

    def _repr_html_(self) -> str:
        random = self.random or [float("nan")] * len(self.sizes)
        rows = [(size, f"{value:.3f}", f"{baseline:.3f}") for size, value, baseline in zip(self.sizes, self.values, random)]
        caption = f"faithfulness of the strongest edges by {self.method} · {self.model_name}"
        return html_table(caption, ["edges", "faithfulness", "random edges"], rows, numeric=[0, 1, 2])

    def figure(self) -> Any:
        """A plotly line chart of faithfulness against circuit size (log scale), the random baseline dashed."""
        import plotly.graph_objects as go

        figure = go.Figure(go.Scatter(x=self.sizes, y=self.values, mode="lines+markers", name=f"strongest ({self.method})"))
        if self.random is not None:
            figure.add_trace(go.Scatter(x=self.sizes, y=self.random, mode="lines+markers", name="random edges",
                                        line={"dash": "dash"}))
        figure.update_layout(title=escape(f"faithfulness · {self.model_name}"), xaxis={"type": "log", "title": "edges"},
                             yaxis={"title": "faithfulness (0 = corrupted, 1 = clean)"})
        return figure


def _view_nodes(g: Graph) -> list[ViewNode]:
    """The graph's nodes in rows: embeddings at the bottom, then each layer's heads and its MLP, the logits on top."""
    middle = (g.n_heads - 1) / 2
    nodes = [ViewNode("embed", "embed", 0, middle, "the token (and position) embeddings")]
    for layer in range(g.n_layers):
        nodes += [
            ViewNode(f"A{layer}.{h}", f"{layer}.{h}", 2 * layer + 1, h, f"head {layer}.{h}", head=(layer, h))
            for h in range(g.n_heads)
        ]
        nodes.append(ViewNode(f"MLP {layer}", f"MLP {layer}", 2 * layer + 2, middle, f"the MLP of layer {layer}"))
    nodes.append(ViewNode("logits", "logits", 2 * g.n_layers + 1, middle, "the logits (through the final norm)"))
    return nodes


def _row_labels(g: Graph) -> list[str]:
    return ["embeddings", *[name for layer in range(g.n_layers) for name in (f"heads {layer}", f"MLP {layer}")], "logits"]


def _target(g: Graph, receiver) -> str:
    """The view node a receiver's edges end at: its own, or under grouped-query attention (a key/value head) the
    first query head of its group."""
    node = receiver.node
    if node.kind == "head" and receiver.input in ("k", "v") and g.n_kv_heads != g.n_heads:
        return f"A{node.layer}.{node.head * (g.n_heads // g.n_kv_heads)}"
    return node.name


def _default_sizes(n_edges: int) -> list[int]:
    sizes, size = [], 1
    while size < n_edges:
        sizes += [size, 3 * size]
        size *= 10
    return [*[s for s in sizes if s < n_edges], n_edges]
