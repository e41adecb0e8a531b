"""Checkers for tutorial 04, "Circuits".

Each recomputes the answer in plain PyTorch on the Hugging Face GPT-2 modules, never through `nm.circuits`,
which is what the tutorial teaches, so a bug in either shows up as a disagreement:

* the computational graph, by enumerating every (sender, receiver) pair and keeping those where the sender runs
  before the receiver reads the residual stream;
* edge attribution scores, EAP and EAP-IG, as (clean - corrupted output of the sender) . (gradient of the metric
  at the receiver's input), the gradient averaged over `steps` runs whose input embeddings move from the corrupted
  prompts' towards the clean ones' (steps = 1 is EAP). Every receiver reads its own copy of the residual stream
  (a head's query, key and value each through `ln_1` and that head's columns of `c_attn`), so autograd gives each
  receiver its own gradient;
* a circuit's faithfulness, by exact edge patching: a forward of the clean prompts in which every receiver reads
  the residual stream minus, for each sender whose edge to it is cut, that sender's (current - corrupted) output.
  0 is the corrupted run's metric and 1 the clean run's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .ch03 import _Pairs
from .feedback import failed, is_placeholder, module_of, not_started, passed

__all__ = ["FAITHFUL", "check_edge_count", "check_key_sender", "check_name_mover_input", "check_smallest_circuit"]

FAITHFUL = 0.8
"""Exercise 3 asks for the smallest circuit of strongest edges whose faithfulness is at least this."""

SHAPES = ((1, 1), (3, 2), (12, 12))
"""Besides the tutorial model's, the (layers, heads) that exercise 1's count is tried on: (12, 12) is GPT-2 small."""


def check_edge_count(answer: Callable[[int, int], Any], model: Any, *, reveal: bool = False) -> bool:
    """Check `answer(n_layers, n_heads)`: the number of edges of a GPT-2-style graph with q/k/v receivers separate,
    on the model's shape and on `SHAPES`, against an enumeration of every sender and receiver."""
    config = module_of(model).config
    shapes = [(config.n_layer, config.n_head), *SHAPES]

    def solution() -> str:
        return (
            "each receiver in layer L reads the embeddings and every head and MLP of layers 0 .. L-1 (1 + L(H+1) "
            "senders), the MLP also reads its own layer's H heads, and the logits read all 1 + n_layers(H+1) senders: "
            "the sum over layers of 3H(1 + L(H+1)) + (1 + L(H+1) + H), plus 1 + n_layers(H+1)"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function count_edges(n_layers, n_heads); got a {type(answer).__name__}",
                      solution, reveal)
    got = []
    for layers, heads in shapes:
        value = answer(layers, heads)
        if is_placeholder(value):
            return not_started(solution, reveal)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return failed(f"count_edges({layers}, {heads}) should return a whole number; got {value!r:.60}", solution, reveal)
        got.append(value)
    expected = [len(_edges(layers, heads)) for layers, heads in shapes]
    if got == expected:
        (layers, heads), *_ = shapes
        return passed(
            f"count_edges agrees with a count of every (sender, receiver) pair: {expected[0]:,} edges for "
            f"{layers} layers × {heads} heads, and {expected[-1]:,} for GPT-2 small's 12 × 12"
        )
    mistakes = {
        "qkv": "each head has three receivers, its query, key and value inputs, since q/k/v are separate",
        "same_layer_mlp": "a layer's MLP reads the residual stream after that layer's attention: every head feeds the "
                          "MLP of its own layer too",
        "same_layer_heads": "the heads of one layer read the same residual stream at the same time: they do not feed "
                            "each other",
        "embed": "the token embeddings are a sender too: every receiver reads them",
        "logits": "the logits are a receiver too: they read every sender",
    }
    for mistake, hint in mistakes.items():
        if got == [len(_edges(layers, heads, **{mistake: mistake in ("same_layer_heads",)})) for layers, heads in shapes]:
            return failed(hint, solution, reveal)
    first = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    layers, heads = shapes[first]
    return failed(
        f"count_edges({layers}, {heads}) returned {got[first]:,}, and that is not the number of (sender, receiver) "
        f"pairs in which the sender runs before the receiver reads: count, for each receiver, the senders before it",
        solution, reveal,
    )


def check_key_sender(
    answer: Any, model: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor],
    *, steps: int, reveal: bool = False,
) -> bool:
    """Check `(0, head)`: the layer-0 head whose edges into layer 1's keys (A0.head -> A1.*.k) have the largest
    total EAP-IG score with `steps` steps, on the token tensors `clean` and `corrupt` with `metric` (a function of
    logits `[prompt, position, vocab]` returning `[prompt]`)."""
    edges = _Edges(model, {"input_ids": torch.as_tensor(clean)}, {"input_ids": torch.as_tensor(corrupt)}, metric)
    scores = edges.scores(steps)
    totals = {part: edges.into_layer1(scores, part) for part in "qkv"}
    keys = totals["k"]
    ranked = sorted(keys, key=keys.get, reverse=True)
    best = ranked[0]

    def solution() -> str:
        return f"(0, {best}): its edges into layer 1's keys total {_percent(keys[best])}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    head = _head(answer)
    if head is None:
        return failed(f"the answer should be a (layer, head) tuple such as (0, 3); got {answer!r:.60}", solution, reveal)
    layer, index = head
    if layer != 0:
        return failed(f"the senders asked for are layer-0 heads, (0, head); {layer}.{index} is not one", solution, reveal)
    if index not in keys:
        return failed(f"layer 0 has heads 0 to {len(keys) - 1}; there is no head 0.{index}", solution, reveal)
    if index == best:
        second = ranked[1]
        return passed(
            f"head 0.{best}'s edges into layer 1's keys total {_percent(keys[best])} of the clean − corrupted "
            f"difference, the most of any layer-0 head (next: head 0.{second}, {_percent(keys[second])})"
        )
    for part, name in (("q", "queries"), ("v", "values")):
        if index == max(totals[part], key=totals[part].get):
            return failed(f"head 0.{index} sends the most into layer 1's {name}: the question is about the keys (.k)",
                          solution, reveal)
    if steps > 1:
        eap_keys = edges.into_layer1(edges.scores(1), "k")
        if index == max(eap_keys, key=eap_keys.get):
            return failed("that is the answer by EAP's scores (steps=1): use the EAP-IG scores", solution, reveal)
    return failed(
        f"the edges of head 0.{index} into layer 1's keys total {_percent(keys[index])}, and another layer-0 head's "
        "total more: add up each head's edges A0.h->A1.0.k, A0.h->A1.1.k, ...",
        solution, reveal,
    )


def check_smallest_circuit(
    answer: Any, model: Any, clean: torch.Tensor, corrupt: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor],
    *, steps: int, reveal: bool = False,
) -> bool:
    """Check `k`: the smallest number of strongest edges (by |EAP-IG score| with `steps` steps) whose circuit has a
    faithfulness of at least `FAITHFUL`, measured by exact edge patching."""
    edges = _Edges(model, {"input_ids": torch.as_tensor(clean)}, {"input_ids": torch.as_tensor(corrupt)}, metric)
    faithfulness = edges.faithfulness_by_size(edges.scores(steps))
    expected = edges.smallest(faithfulness)

    def solution() -> str:
        return (
            f"{expected}: the {expected} strongest edges are {_percent(faithfulness(expected))} faithful, the "
            f"{expected - 1} strongest {_percent(faithfulness(expected - 1))}"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, int):
        return failed(f"the answer should be a number of edges, an int; got {answer!r:.60}", solution, reveal)
    n = len(edges.edges)
    if not 1 <= answer <= n:
        return failed(f"a circuit has between 1 and {n} edges; got {answer}", solution, reveal)
    if answer == expected:
        return passed(
            f"the {answer} strongest edges are the smallest circuit that reaches {FAITHFUL:.0%}: "
            f"{_percent(faithfulness(answer))} faithful, while the {answer - 1} strongest reach "
            f"{_percent(faithfulness(answer - 1))}"
        )
    if steps > 1 and answer == edges.smallest(edges.faithfulness_by_size(edges.scores(1))):
        return failed("that is the smallest circuit by EAP's ranking (steps=1): rank the edges by the EAP-IG scores",
                      solution, reveal)
    if faithfulness(answer) >= FAITHFUL:
        return failed(
            f"the {answer} strongest edges are {_percent(faithfulness(answer))} faithful, but a smaller circuit reaches "
            f"{FAITHFUL:.0%} too: measure every size from 1 up (faithfulness need not grow with every edge added)",
            solution, reveal,
        )
    return failed(
        f"the {answer} strongest edges are only {_percent(faithfulness(answer))} faithful: below {FAITHFUL:.0%}",
        solution, reveal,
    )


def check_name_mover_input(
    answer: Any, model: Any, prompts: Sequence[dict], *, steps: int, head: tuple[int, int] = (1, 2), reveal: bool = False,
) -> bool:
    """Check "sender->receiver": the edge into one of `head`'s inputs (its query, key or value) with the largest
    |EAP-IG score| (`steps` steps) on the IOI prompt records `prompts`, with the logit difference IO - S."""
    pairs = _Pairs(model, prompts)
    rows = torch.arange(len(prompts))

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return pairs.diffs(logits[rows, pairs.last].float())

    edges = _Edges(model, pairs.clean, pairs.corrupt, logit_diff)
    scores = edges.scores(steps)
    layer, index = head
    inputs = tuple(f"A{layer}.{index}.{part}" for part in "qkv")
    into = sorted(((s, r) for s, r in edges.edges if r in inputs), key=lambda e: -abs(scores[e]))
    best, second = into[0], into[1]

    def solution() -> str:
        return f"{best[0]}->{best[1]}, with a score of {_percent(scores[best])}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if isinstance(answer, tuple) and answer and isinstance(answer[0], str):  # an entry of CircuitGraph.top
        answer = answer[0]
    if not isinstance(answer, str):
        return failed(f"the answer should be an edge's name, a string such as 'A0.1->A1.2.k'; got {answer!r:.60}",
                      solution, reveal)
    edge = _edge(answer)
    if edge == (best[0].lower(), best[1].lower()):
        return passed(
            f"{best[0]}->{best[1]} is the strongest edge into head {layer}.{index}, with {_percent(scores[best])} of the "
            f"clean − corrupted difference (next: {second[0]}->{second[1]}, {_percent(scores[second])})"
        )
    known = {(s.lower(), r.lower()): (s, r) for s, r in edges.edges}
    if edge is None or edge not in known:
        return failed(f"there is no edge {answer!r} in the graph: edges are named like 'A0.1->A1.2.k' or 'MLP 0->logits'",
                      solution, reveal)
    sender, receiver = known[edge]
    if sender == f"A{layer}.{index}":
        return failed(f"{answer} leaves head {layer}.{index}: the question asks for an edge into it, one whose receiver is "
                      f"{', '.join(inputs)}", solution, reveal)
    if receiver not in inputs:
        return failed(f"{answer} does not reach head {layer}.{index}: its receiver must be one of {', '.join(inputs)}",
                      solution, reveal)
    if sender == best[0]:
        return failed(f"the right sender, but it reaches head {layer}.{index} more strongly through another of its inputs",
                      solution, reveal)
    return failed(f"{answer} scores {_percent(scores[(sender, receiver)])}; another edge into head {layer}.{index} scores "
                  "more (compare |score|)", solution, reveal)


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sender:
    name: str
    kind: str  # "embed", "head", "mlp"
    layer: int  # -1 for the embeddings


@dataclass(frozen=True)
class _Receiver:
    name: str
    kind: str  # "head", "mlp", "logits"
    layer: int  # the number of layers for the logits


def _senders(n_layers: int, n_heads: int, embed: bool = True) -> list[_Sender]:
    senders = [_Sender("embed", "embed", -1)] if embed else []
    for layer in range(n_layers):
        senders += [_Sender(f"A{layer}.{head}", "head", layer) for head in range(n_heads)]
        senders.append(_Sender(f"MLP {layer}", "mlp", layer))
    return senders


def _receivers(n_layers: int, n_heads: int, qkv: bool = True, logits: bool = True) -> list[_Receiver]:
    receivers = []
    for layer in range(n_layers):
        for head in range(n_heads):
            names = [f"A{layer}.{head}.{part}" for part in "qkv"] if qkv else [f"A{layer}.{head}"]
            receivers += [_Receiver(name, "head", layer) for name in names]
        receivers.append(_Receiver(f"MLP {layer}", "mlp", layer))
    return receivers + ([_Receiver("logits", "logits", n_layers)] if logits else [])


def _edges(n_layers: int, n_heads: int, *, qkv: bool = True, same_layer_mlp: bool = True, same_layer_heads: bool = False,
           embed: bool = True, logits: bool = True) -> list[tuple[str, str]]:
    """Every (sender, receiver) pair in which the sender writes before the receiver reads (the keywords make the
    graphs of exercise 1's usual mistakes)."""

    def feeds(sender: _Sender, receiver: _Receiver) -> bool:
        if sender.layer < receiver.layer:
            return True
        if sender.layer == receiver.layer and sender.kind == "head":
            return (receiver.kind == "mlp" and same_layer_mlp) or (receiver.kind == "head" and same_layer_heads)
        return False

    return [
        (s.name, r.name)
        for s in _senders(n_layers, n_heads, embed)
        for r in _receivers(n_layers, n_heads, qkv, logits)
        if feeds(s, r)
    ]


class _Edges:
    """A GPT-2's graph on a pair of clean and corrupted inputs (dicts for the HF module): EAP / EAP-IG scores of
    its edges and the faithfulness of circuits, in plain PyTorch with hooks on the HF modules."""

    def __init__(self, model: Any, clean: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor],
                 metric: Callable[[torch.Tensor], torch.Tensor]):
        self.module = module_of(model)
        self.base = self.module.transformer
        self.blocks = self.base.h
        config = self.module.config
        self.n_layers, self.n_heads = config.n_layer, config.n_head
        self.d_model = config.n_embd
        self.d_head = self.d_model // self.n_heads
        self.clean, self.corrupt, self.metric = clean, corrupt, metric
        self.senders = [s.name for s in _senders(self.n_layers, self.n_heads)]
        self.receivers = [r.name for r in _receivers(self.n_layers, self.n_heads)]
        self.edges = _edges(self.n_layers, self.n_heads)
        with torch.no_grad():
            self.clean_out, clean_logits = self._run(clean)
            self.corrupt_out, corrupt_logits = self._run(corrupt)
        self.clean_value = self._value(clean_logits)
        self.corrupt_value = self._value(corrupt_logits)
        self._scores: dict[int, dict[tuple[str, str], float]] = {}

    def scores(self, steps: int) -> dict[tuple[str, str], float]:
        """Every edge's EAP-IG score with `steps` steps (EAP for 1), normalised: 1 = the clean - corrupted difference."""
        if steps not in self._scores:
            with torch.no_grad():
                clean_embeds = self.base.wte(self.clean["input_ids"])
                corrupt_embeds = self.base.wte(self.corrupt["input_ids"])
            gradients = None
            for step in range(steps):
                embeds = corrupt_embeds + step / steps * (clean_embeds - corrupt_embeds)
                grads = self._gradients(embeds)
                gradients = grads if gradients is None else gradients + grads
            gradients = gradients / steps  # [receiver, prompt, position, d_model]
            differences = torch.stack([self.clean_out[s] - self.corrupt_out[s] for s in self.senders])
            products = torch.einsum("sbpd,rbpd->sr", differences.double(), gradients.double())
            products /= self.clean_value - self.corrupt_value
            sender, receiver = {n: i for i, n in enumerate(self.senders)}, {n: i for i, n in enumerate(self.receivers)}
            self._scores[steps] = {(s, r): float(products[sender[s], receiver[r]]) for s, r in self.edges}
        return self._scores[steps]

    def faithfulness(self, kept: set[tuple[str, str]]) -> float:
        """The normalised metric of the clean prompts run with only the `kept` edges carrying clean values."""
        cut: dict[str, list[str]] = {r: [] for r in self.receivers}
        for s, r in self.edges:
            if (s, r) not in kept:
                cut[r].append(s)

        def read(receiver: str, residual: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
            for sender in cut[receiver]:
                residual = residual - (outputs[sender] - self.corrupt_out[sender])
            return residual

        with torch.no_grad():
            _, logits = self._run(self.clean, read)
        return (self._value(logits) - self.corrupt_value) / (self.clean_value - self.corrupt_value)

    def faithfulness_by_size(self, scores: dict[tuple[str, str], float]) -> Callable[[int], float]:
        """k -> the faithfulness of the circuit of the k edges of largest |score| (each measured once, when asked)."""
        order = sorted(self.edges, key=lambda e: -abs(scores[e]))
        measured: dict[int, float] = {0: 0.0}

        def faithfulness(k: int) -> float:
            if k not in measured:
                measured[k] = self.faithfulness(set(order[:k]))
            return measured[k]

        return faithfulness

    def smallest(self, faithfulness: Callable[[int], float]) -> int:
        """The smallest k whose circuit reaches `FAITHFUL` (the full circuit, the clean run, always does)."""
        return next(k for k in range(1, len(self.edges) + 1) if faithfulness(k) >= FAITHFUL)

    def into_layer1(self, scores: dict[tuple[str, str], float], part: str) -> dict[int, float]:
        """Each layer-0 head's total score over its edges into the `part` ("q", "k" or "v") input of layer 1's heads."""
        return {
            head: sum(scores[(f"A0.{head}", f"A1.{other}.{part}")] for other in range(self.n_heads))
            for head in range(self.n_heads)
        }

    def _value(self, logits: torch.Tensor) -> float:
        return float(self.metric(logits).float().mean())

    def _gradients(self, embeds: torch.Tensor) -> torch.Tensor:
        """The metric's gradient at every receiver's input `[receiver, prompt, position, d_model]`, on a run of the
        input embeddings `embeds`."""
        copies: dict[str, torch.Tensor] = {}

        def read(receiver: str, residual: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
            copies[receiver] = residual.clone()  # a node of its own: its gradient is this receiver's alone
            return copies[receiver]

        embeds = embeds.detach().requires_grad_(True)
        inputs = {"inputs_embeds": embeds, **{k: v for k, v in self.corrupt.items() if k == "attention_mask"}}
        with torch.enable_grad():
            _, logits = self._run(inputs, read)
            value = self.metric(logits).float().mean()
            grads = torch.autograd.grad(value, [copies[r] for r in self.receivers], allow_unused=True)
        return torch.stack([torch.zeros_like(embeds) if g is None else g.detach() for g in grads])

    def _run(self, inputs: dict[str, torch.Tensor],
             read: Callable[[str, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A forward in which each receiver reads `read(receiver, residual stream, senders' outputs so far)` (None:
        the residual stream itself); returns every sender's output `[prompt, position, d_model]` and the logits."""
        outputs: dict[str, torch.Tensor] = {}
        residuals: dict[int, torch.Tensor] = {}
        d, dh = self.d_model, self.d_head
        handles = []

        def block_input(layer: int):
            def hook(module, args, kwargs):
                residual = args[0] if args else kwargs["hidden_states"]
                residuals[layer] = residual
                if layer == 0:
                    outputs["embed"] = residual

            return hook

        def heads_input(layer: int):
            def hook(module, args, output):  # c_attn: every head's q, k, v from its own copy of the residual stream
                if read is None:
                    return None
                norm = self.blocks[layer].ln_1
                columns = []
                for p, part in enumerate("qkv"):
                    for head in range(self.n_heads):
                        features = slice(p * d + head * dh, p * d + (head + 1) * dh)
                        residual = read(f"A{layer}.{head}.{part}", residuals[layer], outputs)
                        columns.append(norm(residual) @ module.weight[:, features] + module.bias[features])
                return torch.cat(columns, -1)

            return hook

        def heads_output(layer: int):
            def hook(module, args):  # c_proj's input is every head's z: a head's output is its slice times W_O's rows
                z = args[0]
                for head in range(self.n_heads):
                    features = slice(head * dh, (head + 1) * dh)
                    outputs[f"A{layer}.{head}"] = z[..., features] @ module.weight[features, :]

            return hook

        def reader(name: str):
            def hook(module, args):
                return None if read is None else (read(name, args[0], outputs), *args[1:])

            return hook

        def mlp_output(layer: int):
            def hook(module, args, output):
                outputs[f"MLP {layer}"] = output

            return hook

        try:
            for layer, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(block_input(layer), with_kwargs=True))
                handles.append(block.attn.c_attn.register_forward_hook(heads_input(layer)))
                handles.append(block.attn.c_proj.register_forward_pre_hook(heads_output(layer)))
                handles.append(block.ln_2.register_forward_pre_hook(reader(f"MLP {layer}")))
                handles.append(block.mlp.register_forward_hook(mlp_output(layer)))
            handles.append(self.base.ln_f.register_forward_pre_hook(reader("logits")))
            logits = self.module(**inputs, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return outputs, logits


def _head(answer: Any) -> tuple[int, int] | None:
    """`answer` as (layer, head): a pair of ints, or a name such as "A0.1" or "0.1"."""
    if isinstance(answer, str):
        match = re.fullmatch(r"\s*(?:A|L)?(\d+)\s*[.H]\s*(\d+)\s*", answer, re.IGNORECASE)
        return (int(match.group(1)), int(match.group(2))) if match else None
    if isinstance(answer, (tuple, list)) and len(answer) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in answer):
        return int(answer[0]), int(answer[1])
    return None


def _edge(answer: str) -> tuple[str, str] | None:
    """An edge's name as a lower-case (sender, receiver), spaces normalised ("MLP0" = "MLP 0"); None if no arrow."""
    parts = re.split(r"\s*(?:->|→)\s*", answer.strip())
    if len(parts) != 2:
        return None
    return tuple(re.sub(r"^mlp\s*(\d+)$", r"mlp \1", part.lower()) for part in parts)  # type: ignore[return-value]


def _percent(share: float) -> str:
    """A score as a percentage of the clean - corrupted difference: whole percent, or one decimal under 10%."""
    text = f"{share:.0%}" if abs(share) >= 0.095 else f"{share:.1%}"
    return text.replace("-0.0%", "0.0%")
