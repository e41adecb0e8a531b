"""Attribution graphs made by circuit-tracer (or served by Neuronpedia), read from their JSON and drawn offline.

circuit-tracer's `create_graph_files` writes one JSON object per graph: `metadata` (`slug`, `scan`, `prompt`,
`prompt_tokens`, `node_threshold`, `schema_version`, ...), `qParams` (the front end's saved view state), `nodes` and
`links`. A node has a `node_id`, a `feature_type` ("embedding", "cross layer transcoder", "mlp reconstruction error",
"logit", or another kind such as Neuronpedia's), a `layer` ("E" for embeddings; a number, as text or not, for the
rest), the token position `ctx_idx`, and optionally `feature`, `clerp` (a feature's label), `activation`,
`influence` (the cumulative share of influence used for pruning: lower is more influential), `token_prob` and
`is_target_logit`. A link is `{source, target, weight}`: the direct effect of one node on another. Its own front end
needs d3 and friends from CDNs through a local server; here the same graph renders as NeuronMap's layered SVG, laid
out as circuit-tracer lays it out: tokens along the x axis, embeddings at the bottom, a row per layer, logits on top.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..display import Renders
from ..errors import InputError
from ..graph_widget import GraphView
from ..graphview import MAX_EDGES, Edge, Node as ViewNode

EMBEDDING, LOGIT = "embedding", "logit"
_LABEL_CHARS = 7
_LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.DOTALL)
_FEATURE_ID = re.compile(r"^[^_]+_(\d+)_\d+$")


@dataclass(frozen=True)
class AttributionNode:
    """A node of an attribution graph: `kind` is the file's `feature_type`; `layer` is the model layer (None for
    embeddings and logits, which sit below and above every layer); `position` is the token position (`ctx_idx`).
    `data` keeps the node exactly as the file wrote it."""

    id: str
    kind: str
    layer: int | None
    position: int
    feature: int | None = None
    clerp: str = ""
    activation: float | None = None
    influence: float | None = None
    token_prob: float = 0.0
    is_target_logit: bool = False
    data: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class AttributionLink:
    """The direct effect `weight` of node `source` on node `target`."""

    source: str
    target: str
    weight: float


def read_attribution_graph(source: str | os.PathLike | Mapping[str, Any]) -> AttributionGraph:
    """The attribution graph in circuit-tracer's JSON: a path to the file `create_graph_files` (or Neuronpedia)
    wrote, or that file already loaded as a dict. Raises `InputError` naming what is missing or wrong when it is
    not such a graph."""
    if isinstance(source, Mapping):
        data, where = source, "the graph"
    elif isinstance(source, (str, os.PathLike)):
        data, where = _load(source), os.fspath(source)
    else:
        raise InputError(f"expected a path to circuit-tracer's graph JSON or the loaded dict, got {type(source).__name__}")
    if not isinstance(data, Mapping):
        raise InputError(
            f"{where} is not a circuit-tracer attribution graph: a JSON object is expected, got {type(data).__name__}"
        )
    missing = [key for key in ("metadata", "nodes", "links") if key not in data]
    if missing:
        raise InputError(
            f"{where} is not a circuit-tracer attribution graph: it has no {', '.join(repr(k) for k in missing)} "
            f"(its keys: {', '.join(map(repr, data)) or 'none'})"
        )
    metadata = data["metadata"]
    if not isinstance(metadata, Mapping) or not _strings(metadata.get("prompt_tokens")):
        raise InputError(f"{where}: 'metadata' must be an object with 'prompt_tokens', a list of strings")
    tokens = list(metadata["prompt_tokens"])
    nodes = [_node(i, raw, len(tokens)) for i, raw in enumerate(_list(data, "nodes", where))]
    links = [_link(i, raw) for i, raw in enumerate(_list(data, "links", where))]
    return AttributionGraph(nodes, links, tokens, dict(metadata))


class AttributionGraph(Renders):
    """An attribution graph read from circuit-tracer's JSON: `nodes` (`AttributionNode`), `links`
    (`AttributionLink`), the `prompt_tokens` and the file's `metadata`. A node id written twice names the later
    node, as in circuit-tracer's own front end (its error node "0_{layer}_{pos}" can share the id of a layer-0
    feature); `repeated` counts such ids."""

    def __init__(self, nodes: list[AttributionNode], links: list[AttributionLink], prompt_tokens: list[str],
                 metadata: dict[str, Any]):
        by_id = {node.id: node for node in nodes}
        self.nodes = list(by_id.values())
        self.repeated = len(nodes) - len(by_id)
        unknown = [(i, end) for i, link in enumerate(links) for end in (link.source, link.target) if end not in by_id]
        if unknown:
            i, end = unknown[0]
            raise InputError(
                f"link {i} names node {end!r}, which is not among the graph's {len(by_id)} nodes "
                f"({len(unknown)} link end(s) name unknown nodes)"
            )
        self.links, self.prompt_tokens, self.metadata = links, prompt_tokens, metadata
        self._by_id = by_id

    def node(self, node_id: str) -> AttributionNode:
        """The node named `node_id`."""
        try:
            return self._by_id[node_id]
        except KeyError:
            raise InputError(f"no node {node_id!r} in this graph ({len(self._by_id)} nodes)") from None

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` links with the largest |weight|, largest first, as ("source->target", weight)."""
        strongest = sorted(self.links, key=lambda link: abs(link.weight), reverse=True)[: max(k, 0)]
        return [(f"{link.source}->{link.target}", link.weight) for link in strongest]

    def to_networkx(self) -> Any:
        """The graph as a `networkx.DiGraph` (networkx must be installed): a node per node id with the file's fields
        as attributes, an edge per link with its `weight`, and the metadata as graph attributes."""
        try:
            import networkx
        except ImportError as error:
            raise InputError("to_networkx needs networkx (pip install networkx)") from error
        result = networkx.DiGraph(**self.metadata)
        for node in self.nodes:
            result.add_node(node.id, **{key: value for key, value in node.data.items() if key != "node_id"})
        for link in self.links:
            result.add_edge(link.source, link.target, weight=link.weight)
        return result

    def __repr__(self) -> str:
        kinds = Counter(node.kind for node in self.nodes)
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        return (
            f"AttributionGraph({self.metadata.get('slug', '?')!r} on {self.metadata.get('scan', '?')!r}: "
            f"{len(self.nodes)} nodes ({counts}), {len(self.links):,} links, {len(self.prompt_tokens)} prompt tokens)"
        )

    def view(self) -> GraphView:
        """The interactive graph (static HTML everywhere, a live widget in a kernel): a top-k slider and a
        threshold re-filter the links in the browser, scroll zooms, dragging pans, hovering tells weights, and
        clicking a node highlights its inputs and outputs. It needs no network, unlike circuit-tracer's own page."""
        return GraphView(self._view_parts())

    def _repr_html_(self) -> str:
        return self.view()._repr_html_()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.view()._repr_mimebundle_()

    def _view_parts(self) -> dict[str, Any]:
        """The keyword arguments of `graph_html` for this graph (nodes, edges, title, row_labels, description, note):
        the static view and the live one draw the same parts. Nodes are those on the `MAX_EDGES` strongest links
        plus every embedding and logit, and the edges are the links among them."""
        strongest = sorted(self.links, key=lambda link: abs(link.weight), reverse=True)[:MAX_EDGES]
        on_strong = {end for link in strongest for end in (link.source, link.target)}
        shown = [node for node in self.nodes if node.id in on_strong or node.kind in (EMBEDDING, LOGIT)]
        kept = {node.id for node in shown}
        links = [link for link in self.links if link.source in kept and link.target in kept]
        top_layer = max((node.layer for node in self.nodes if node.layer is not None), default=-1)
        edges = [
            Edge(link.source, link.target, link.weight,
                 title=f"{self._name(link.source)} → {self._name(link.target)}: {link.weight:+.4g}")
            for link in links
        ]
        return {
            "nodes": self._placed(shown, top_layer),
            "edges": edges,
            "title": f"attribution graph · {self.metadata.get('slug', '')}",
            "row_labels": ["embeddings", *(f"layer {layer}" for layer in range(top_layer + 1)), "logits"],
            "description": self._description(),
            "note": self._note(len(shown), len(links)),
        }

    def _placed(self, shown: list[AttributionNode], top_layer: int) -> list[ViewNode]:
        """`shown` as view nodes: a row per layer (embeddings 0, logits on top), a band of columns per token position
        as wide as its most crowded row, and the nodes of one row and position side by side, centred in the band."""
        groups: dict[tuple[int, int], list[AttributionNode]] = defaultdict(list)
        for node in shown:
            groups[_row(node, top_layer), node.position].append(node)
        widths = [1] * len(self.prompt_tokens)
        for (_, position), members in groups.items():
            widths[position] = max(widths[position], len(members))
        starts = [sum(widths[:position]) for position in range(len(widths))]
        placed = []
        for (row, position), members in sorted(groups.items()):
            members.sort(key=_order)
            offset = starts[position] + (widths[position] - len(members)) / 2
            placed += [ViewNode(node.id, self._label(node), row, offset + i, self._title(node))
                       for i, node in enumerate(members)]
        return placed

    def _label(self, node: AttributionNode) -> str:
        if node.kind == EMBEDDING:
            text = _visible(self.prompt_tokens[node.position])
        elif node.kind == LOGIT:
            match = _LOGIT_CLERP.match(node.clerp)
            text = _visible(match.group(1)) if match else node.clerp or node.id
        elif "error" in node.kind:
            text = "err"
        else:
            text = node.clerp or _feature_index(node)
        return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"

    def _title(self, node: AttributionNode) -> str:
        where = "" if node.layer is None else f" · layer {node.layer}"
        lines = [f"{node.kind}{where} · position {node.position} “{_visible(self.prompt_tokens[node.position])}”",
                 f"node {node.id}" + _identity(node)]
        if node.kind == LOGIT:
            lines.append(f"probability {node.token_prob:.4g}" + (" · the target logit" if node.is_target_logit else ""))
        values = [f"{name} {value:.4g}" for name, value in (("activation", node.activation), ("influence", node.influence))
                  if value is not None]
        if values:
            lines.append(" · ".join(values))
        if node.clerp:
            lines.append(node.clerp)
        return "\n".join(lines)

    def _name(self, node_id: str) -> str:
        node = self._by_id[node_id]
        label = self._label(node)
        return node_id if label == node_id else f"{label} ({node_id})"

    def _description(self) -> str:
        parts = [f"circuit-tracer · {self.metadata.get('scan', '?')}"]
        prompt = str(self.metadata.get("prompt", "".join(self.prompt_tokens)))
        parts.append(f"prompt: {prompt if len(prompt) <= 200 else prompt[:199] + '…'}")
        if self.metadata.get("node_threshold") is not None:
            parts.append(f"node threshold {self.metadata['node_threshold']}")
        return " · ".join(parts)

    def _note(self, n_shown: int, n_links: int) -> str:
        notes = ["link weight = a node's direct effect on another; hover a node for its activation, influence and label"]
        if n_shown < len(self.nodes):
            notes.append(
                f"the graph has {len(self.nodes):,} nodes and {len(self.links):,} links: drawn are the {n_shown:,} nodes "
                f"on its {MAX_EDGES} strongest links and every embedding and logit, with the {n_links:,} links among them"
            )
        if self.repeated:
            notes.append(
                f"{self.repeated} node id(s) written twice: the later node kept, as circuit-tracer's front end does"
            )
        return "; ".join(notes)


def _load(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise InputError(f"no attribution graph file at {os.fspath(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{os.fspath(path)} is not valid JSON ({error}); expected circuit-tracer's graph JSON") from None


def _list(data: Mapping[str, Any], key: str, where: str) -> list:
    if not isinstance(data[key], list):
        raise InputError(f"{where}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data[key]


def _node(i: int, raw: Any, n_tokens: int) -> AttributionNode:
    if not isinstance(raw, Mapping):
        raise InputError(f"node {i} is not an object: {raw!r:.80}")
    missing = [key for key in ("node_id", "feature_type", "layer", "ctx_idx") if key not in raw]
    if missing:
        raise InputError(f"node {i} ({raw.get('node_id', 'no node_id')!r}) has no {', '.join(map(repr, missing))}")
    node_id, kind, position = str(raw["node_id"]), str(raw["feature_type"]), raw["ctx_idx"]
    if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < n_tokens:
        raise InputError(f"node {node_id!r} is at ctx_idx {position!r}, not a position of the {n_tokens} prompt tokens")
    layer = _layer(node_id, kind, raw["layer"])
    return AttributionNode(
        node_id, kind, layer, position, feature=_number(node_id, raw, "feature", int),
        clerp=str(raw.get("clerp") or ""), activation=_number(node_id, raw, "activation", float),
        influence=_number(node_id, raw, "influence", float), token_prob=_number(node_id, raw, "token_prob", float) or 0.0,
        is_target_logit=bool(raw.get("is_target_logit", False)), data=dict(raw),
    )


def _layer(node_id: str, kind: str, layer: Any) -> int | None:
    """The model layer of a node: None for embeddings (layer "E") and logits (written one past the last layer)."""
    if kind == EMBEDDING or layer == "E" or kind == LOGIT:
        return None
    try:
        number = int(layer) if not isinstance(layer, (bool, float)) else -1
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise InputError(f"node {node_id!r} ({kind}) has layer {layer!r}: expected a layer number, or 'E' for embeddings")
    return number


def _number(node_id: str, raw: Mapping[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise InputError(f"node {node_id!r} has {key} {value!r}: expected a number")
    return kind(value)


def _link(i: int, raw: Any) -> AttributionLink:
    if not isinstance(raw, Mapping):
        raise InputError(f"link {i} is not an object: {raw!r:.80}")
    missing = [key for key in ("source", "target", "weight") if key not in raw]
    if missing:
        raise InputError(f"link {i} has no {', '.join(map(repr, missing))}")
    weight = raw["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise InputError(
            f"link {i} ({raw['source']!r} -> {raw['target']!r}) has weight {weight!r}: expected a finite number"
        )
    return AttributionLink(str(raw["source"]), str(raw["target"]), float(weight))


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _row(node: AttributionNode, top_layer: int) -> int:
    if node.kind == LOGIT:
        return top_layer + 2
    return 0 if node.layer is None else node.layer + 1


def _order(node: AttributionNode) -> tuple:
    """Within a row and position: logits by probability; the rest by influence (most influential first), errors last."""
    if node.kind == LOGIT:
        return (0, -node.token_prob, node.id)
    return ("error" in node.kind, node.influence if node.influence is not None else math.inf, node.id)


def _feature_index(node: AttributionNode) -> str:
    """A feature's index in its transcoder: the middle of circuit-tracer's id "{layer}_{index}_{position}" (its
    `feature` field packs layer and index into one number), else that field."""
    match = _FEATURE_ID.match(node.id)
    return match.group(1) if match else str(node.feature)


def _identity(node: AttributionNode) -> str:
    if node.kind == LOGIT:
        return "" if node.feature is None else f" · token id {node.feature}"
    if node.kind == EMBEDDING or "error" in node.kind:
        return ""
    return f" · feature {_feature_index(node)}"


def _visible(token: str) -> str:
    """A token with its newlines, tabs and carriage returns shown as circuit-tracer shows them."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")
