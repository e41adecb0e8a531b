"""Choosing a circuit from edge scores, pruning what cannot matter, and measuring how faithful circuits are.

A circuit is a boolean mask over the graph's edges. `strongest` keeps the k edges of largest |score| (or every
edge at or above a threshold); `greedy` grows a circuit from the logits, edge by edge, always taking the strongest
edge into a node already in it (Hanna et al. 2024), so that every edge reaches the logits; `prune` drops the edges that are on no path from the embeddings to the logits
(exactly patching them changes nothing: a sender none of whose inputs is kept writes its corrupted output).
`faithfulness` runs circuits with exact edge patching: 0 is the corrupted run and 1 the clean run.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError
from ..patching.metrics import Metric
from .exact import MEMORY_BUDGET, circuit_metrics
from .graph import Graph


def strongest(graph: Graph, scores: torch.Tensor, *, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
    """The mask of the `k` edges of largest |score|, or of every edge whose |score| is at least `threshold`."""
    if (k is None) == (threshold is None):
        raise InputError("choose a circuit by k (its number of edges) or by threshold (the smallest |score| kept), one of them")
    strength = scores.abs().masked_fill(~graph.valid, -1)
    if k is not None:
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a number of edges of at least 1, got {k!r}")
        mask = torch.zeros_like(graph.valid)
        mask.view(-1)[strength.flatten().argsort(descending=True)[: min(k, int(graph.valid.sum()))]] = True
        return mask
    mask = graph.valid & (strength >= threshold)
    if not mask.any():
        raise InputError(
            f"no edge has |score| >= {threshold}: the largest is {float(strength.max()):.4g}; lower the threshold"
        )
    return mask


def greedy(graph: Graph, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of `k` edges chosen from the logits down: each the edge of largest |score| among those whose
    receiver feeds a node already in the circuit (the logits, or a sender of an edge already chosen)."""
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a number of edges of at least 1, got {k!r}")
    mask = torch.zeros_like(graph.valid)
    senders, receivers = zip(*greedy_order(graph, scores, k))
    mask[list(senders), list(receivers)] = True
    return mask


def greedy_order(graph: Graph, scores: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The first `n` (sender, receiver) edges `greedy` chooses, in the order it chooses them (so the greedy circuit of
    any size is a prefix)."""
    strength = scores.abs().tolist()
    valid = graph.valid.tolist()
    feeding: list[list[int]] = [[] for _ in graph.nodes]  # node -> the receivers that feed it
    for r, receiver in enumerate(graph.receivers):
        for node in _fed_nodes(graph, receiver):
            feeding[node].append(r)
    candidates: list[tuple[float, int, int]] = []
    opened: set[int] = set()

    def open_node(node: int) -> None:
        for r in feeding[node]:
            if r not in opened:
                opened.add(r)
                candidates.extend((-strength[s][r], s, r) for s in range(len(graph.senders)) if valid[s][r])
        heapq.heapify(candidates)

    in_circuit = {len(graph.senders)}  # the logits
    open_node(len(graph.senders))
    order = []
    while candidates and len(order) < n:
        _, s, r = heapq.heappop(candidates)
        order.append((s, r))
        if s not in in_circuit:
            in_circuit.add(s)
            open_node(s)
    return order


def prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """`mask` without the edges on no path from the embeddings to the logits."""
    feeds = [_fed_nodes(graph, receiver) for receiver in graph.receivers]
    n_senders = len(graph.senders)
    # forward, senders in layer order (a sender feeds only later receivers): a node is reached when one of its
    # inputs has a kept edge from a reached sender
    reached = torch.zeros(n_senders + 1, dtype=torch.bool)
    reached[0] = True  # the embeddings
    for s in range(n_senders):
        if reached[s]:
            for r in mask[s].nonzero().flatten().tolist():
                reached[feeds[r]] = True
    # backward: a sender is useful when one of its kept edges feeds a useful node
    useful = torch.zeros(n_senders + 1, dtype=torch.bool)
    useful[n_senders] = True  # the logits
    for s in reversed(range(n_senders)):
        useful[s] = any(bool(useful[feeds[r]].any()) for r in mask[s].nonzero().flatten().tolist())
    keep_receiver = torch.tensor([bool(useful[nodes].any()) for nodes in feeds])
    return mask & reached[:n_senders, None] & keep_receiver[None, :]


def _fed_nodes(graph: Graph, receiver) -> list[int]:
    """The indices (in `graph.nodes`) of the nodes a receiver's input feeds: its own node, or under grouped-query
    attention every query head sharing the key/value head."""
    node = receiver.node
    if node.kind == "logits":
        return [len(graph.senders)]
    first = 1 + node.layer * (graph.n_heads + 1)
    if node.kind == "mlp":
        return [first + graph.n_heads]
    if receiver.input in ("k", "v") and graph.n_kv_heads != graph.n_heads:
        group = graph.n_heads // graph.n_kv_heads
        return [first + h for h in range(node.head * group, (node.head + 1) * group)]
    return [first + node.head]


def faithfulness(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    graph: Graph,
    circuits: torch.Tensor,
    *,
    memory_budget: int = MEMORY_BUDGET,
) -> torch.Tensor:
    """The normalised metric of each circuit `[circuit]` (`circuits`: `[circuit, sender, receiver]`): the mean over
    prompts of the circuit run's metric, 0 = the corrupted run, 1 = the clean run."""
    values, clean_value, corrupt_value = circuit_metrics(
        model, clean, corrupt, metric, graph, circuits, memory_budget=memory_budget
    )
    if clean_value == corrupt_value:
        raise InputError(f"the metric is {clean_value:.6g} on both the clean and the corrupted prompts: faithfulness is undefined")
    return (values.mean(-1) - corrupt_value) / (clean_value - corrupt_value)


def random_circuits(graph: Graph, sizes: Sequence[int], seed: int) -> torch.Tensor:
    """One circuit of each size, its edges drawn uniformly from the graph's with `seed`: a baseline."""
    generator = torch.Generator().manual_seed(seed)
    edges = graph.valid.nonzero()
    masks = torch.zeros(len(sizes), *graph.valid.shape, dtype=torch.bool)
    for i, size in enumerate(sizes):
        chosen = edges[torch.randperm(len(edges), generator=generator)[:size]]
        masks[i, chosen[:, 0], chosen[:, 1]] = True
    return masks
