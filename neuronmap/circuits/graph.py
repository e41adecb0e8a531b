"""The computational graph circuits are drawn on: senders and receivers joined by paths through the residual stream.

Senders write into the residual stream: the token embeddings (with position embeddings, if any), every attention
head (its output through the output projection) and every MLP. Receivers read it: every head (its query, key
and value inputs as three receivers when `qkv=True`), every MLP, and the logits (through the final norm). A sender
feeds every receiver in a later layer; within a layer the heads feed the MLP (unless the family runs attention
and the MLP in parallel, as GPT-NeoX usually does) and never each other. In grouped-query attention the keys and
values of a group of heads come from one key/value head, so each key/value head is one receiver, named by its
index among the key/value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..patching.cells import n_layers

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """A component of the graph: `kind` is "embed", "head", "mlp" or "logits"; `layer` is -1 for the embeddings
    and the number of layers for the logits; `head` is the head's index (for "head")."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"A{self.layer}.{self.head}"
        if self.kind == "mlp":
            return f"MLP {self.layer}"
        return self.kind


@dataclass(frozen=True)
class Receiver:
    """A node's input from the residual stream: `input` is "q", "k" or "v" for a head read separately, else None."""

    node: Node
    input: str | None = None

    @property
    def name(self) -> str:
        return f"{self.node.name}.{self.input}" if self.input else self.node.name


class Graph:
    """The senders, the receivers and which (sender, receiver) pairs are edges (`valid`, `[sender, receiver]`).

    `positions` is None when positions are merged (one edge stands for its path at every position), else the
    number of positions, each edge then existing once per position (`n_edges` counts them all).
    """

    def __init__(self, n_layers: int, n_heads: int, *, n_kv_heads: int | None = None, qkv: bool = True,
                 parallel: bool = False, positions: int | None = None, model_name: str = "model"):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.qkv, self.parallel, self.positions, self.model_name = qkv, parallel, positions, model_name
        self.senders = [Node("embed", -1)]
        self.receivers: list[Receiver] = []
        for layer in range(n_layers):
            self.senders += [Node("head", layer, h) for h in range(n_heads)] + [Node("mlp", layer)]
            if qkv:
                self.receivers += [Receiver(Node("head", layer, h), "q") for h in range(n_heads)]
                for part in ("k", "v"):
                    self.receivers += [Receiver(Node("head", layer, h), part) for h in range(self.n_kv_heads)]
            else:
                self.receivers += [Receiver(Node("head", layer, h)) for h in range(n_heads)]
            self.receivers.append(Receiver(Node("mlp", layer)))
        self.receivers.append(Receiver(Node("logits", n_layers)))
        self.valid = torch.tensor([[self._feeds(s, r.node) for r in self.receivers] for s in self.senders])
        self._sender_index = {s.name: i for i, s in enumerate(self.senders)}
        self._receiver_index = {r.name: i for i, r in enumerate(self.receivers)}

    def _feeds(self, sender: Node, receiver: Node) -> bool:
        if sender.layer < receiver.layer:
            return True
        same_layer_mlp = sender.layer == receiver.layer and sender.kind == "head" and receiver.kind == "mlp"
        return same_layer_mlp and not self.parallel

    @property
    def n_edges(self) -> int:
        """Every edge, counted once per position when positions are kept."""
        return int(self.valid.sum()) * (self.positions or 1)

    @property
    def nodes(self) -> list[Node]:
        """Every node once, bottom (embeddings) to top (logits)."""
        return [*self.senders, self.receivers[-1].node]

    def sender(self, name: str) -> int:
        """The index of the sender called `name` (e.g. "A0.1", "MLP 0", "embed")."""
        return _index(self._sender_index, name, "sender")

    def receiver(self, name: str) -> int:
        """The index of the receiver called `name` (e.g. "A1.2.k", "MLP 1", "logits")."""
        return _index(self._receiver_index, name, "receiver")

    def edge_names(self) -> list[str]:
        """Every edge (positions merged) as "sender->receiver", senders outermost."""
        return [f"{self.senders[s].name}->{self.receivers[r].name}" for s, r in self.valid.nonzero().tolist()]

    def __repr__(self) -> str:
        qkv = "q/k/v separate" if self.qkv else "q/k/v merged"
        where = f"{self.positions} positions kept" if self.positions else "positions merged"
        return (
            f"Graph({self.model_name}: {len(self.nodes)} nodes, {len(self.senders)} senders, "
            f"{len(self.receivers)} receivers, {self.n_edges:,} edges; {qkv}, {where})"
        )


def graph(model, *, qkv: bool = True, positions: int | None = None) -> Graph:
    """The computational graph of `model` (a NeuronMap model of a family with block hook points).

    `qkv`: a head's query, key and value inputs are separate receivers; `positions`: keep edges per position for
    inputs of this many tokens (None: merged).
    """
    layers = n_layers(model)
    config = model._config
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if positions is not None and (not isinstance(positions, int) or positions < 1):
        raise InputError(f"positions must be a number of tokens (at least 1) or None for merged, got {positions!r}")
    if not qkv and n_kv_heads != n_heads:
        raise InputError(
            f"qkv=False merges each head's query, key and value inputs, but this model's {n_heads} query heads share "
            f"{n_kv_heads} key/value heads (grouped-query attention): use qkv=True"
        )
    parallel = "blocks.0.hook_resid_mid" not in model._points
    return Graph(layers, n_heads, n_kv_heads=n_kv_heads, qkv=qkv, parallel=parallel, positions=positions,
                 model_name=model.name)


def _index(names: dict[str, int], name: str, what: str) -> int:
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, list(names), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise InputError(f"{name!r} is not a {what} of this graph{hint}")
    return names[name]
