"""Exact edge patching: run the clean prompts with only a circuit's edges carrying clean activations.

Every edge outside the circuit carries the corrupted run's value instead: a receiver's input is the residual
stream it reads minus, for each sender whose edge to it is cut, that sender's (current - corrupted) output. The
senders' current outputs are read during the same forward, so an edge's effect reaches later receivers only
through the edges that are kept. A receiver with every edge cut reads the corrupted run's input itself, and one
with every edge kept reads the current one, so the full circuit is the clean run and the empty one the corrupted
run. Each row of a forward carries its own circuit (a mask over the graph's edges), so many circuits share one
forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..patching.metrics import Context, Metric, as_metric
from .ablation import corruption
from .components import check_family, last_only, ln2_input, logits_reader, sender_outputs, traced_run
from .graph import Graph

MEMORY_BUDGET = 1 << 30
"""Bytes of per-row sender differences one stacked forward may hold, by default."""


def circuit_metrics(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    graph: Graph,
    circuits: torch.Tensor,
    *,
    memory_budget: int = MEMORY_BUDGET,
) -> tuple[torch.Tensor, float, float]:
    """The metric `[circuit, prompt]` of each circuit (`circuits`: `[circuit, sender, receiver]` booleans, True =
    the edge carries its clean value, False = its value in the corrupted run of `corrupt`: corrupted prompts,
    `mean_ablation(...)` or `resample_ablation(...)`), and the metric's mean on the clean and on the corrupted run."""
    check_family(model)
    metric = as_metric(metric)
    clean_batch, corrupt_run = corruption(model, clean, corrupt, graph.n_layers)
    n_prompts, length = clean_batch.tokens.shape
    layers = graph.n_layers
    circuits = circuits.to(torch.bool) & graph.valid
    names = _captured(model, layers)
    trim = last_only(model, metric, clean_batch)
    with torch.no_grad():
        corrupted = traced_run(model, corrupt_run.batch, capture=names, interventions=corrupt_run.interventions(), last=trim)
        clean_run = traced_run(model, clean_batch, last=trim)
    last = clean_batch.last_positions.to(model.device)
    at = logits_reader(metric, last, trim)
    prompts = torch.arange(n_prompts, device=model.device)
    evaluate = metric.bind(Context(clean_batch.tokens, clean_batch.attention_mask, last, at(clean_run.logits, prompts), model))
    clean_value = float(evaluate(at(clean_run.logits, prompts), prompts).float().mean())
    corrupt_value = float(evaluate(at(corrupted.logits, prompts), prompts).float().mean())
    if corrupt_run.means is None:
        senders_corrupt = sender_outputs(model, corrupted, graph)
    else:
        senders_corrupt = sender_outputs(model, corrupt_run.means, graph).expand(-1, n_prompts, length, -1)
    per_circuit = len(graph.senders) * n_prompts * length * senders_corrupt.shape[-1] * senders_corrupt.element_size() * 3
    chunk = max(1, memory_budget // max(per_circuit, 1))
    values = []
    for start in range(0, len(circuits), chunk):
        masks = circuits[start : start + chunk]
        patched = _Patched(model, graph, masks, corrupted, senders_corrupt, n_prompts)
        with torch.no_grad(), model.hooks(patched.interventions()):
            logits = model.module(
                input_ids=clean_batch.tokens.repeat(len(masks), 1),
                attention_mask=clean_batch.attention_mask.repeat(len(masks), 1),
                **model._forward_kwargs,
                **({"logits_to_keep": 1} if trim else {}),
            ).logits
        values.append(evaluate(at(logits, prompts.repeat(len(masks))), prompts.repeat(len(masks))).float().reshape(len(masks), n_prompts))
    return torch.cat(values).cpu(), clean_value, corrupt_value


def _captured(model, layers: int) -> list[str]:
    names = ["blocks.0.hook_resid_pre", f"blocks.{layers - 1}.hook_resid_post"]
    for layer in range(layers):
        names += [f"blocks.{layer}.attn.hook_{part}" for part in ("q", "k", "v", "z")]
        names += [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.ln2.hook_normalized"]
    return names


class _Patched:
    """The interventions of one stacked forward whose rows (circuit-major, prompts within) each carry a circuit."""

    def __init__(self, model, graph: Graph, masks: torch.Tensor, corrupted, senders_corrupt: torch.Tensor, n_prompts: int):
        self.model, self.graph, self.corrupted = model, graph, corrupted
        self.n_circuits, self.n_prompts = len(masks), n_prompts
        # cut[row, sender, receiver]: the edge carries the corrupted value in that row
        self.cut = (graph.valid & ~masks).repeat_interleave(n_prompts, dim=0).to(senders_corrupt.dtype)
        self.kept_any = masks.any(1).repeat_interleave(n_prompts, dim=0)  # [row, receiver]
        self.cut_any = self.cut.bool().any(1)
        self.senders_corrupt = senders_corrupt.repeat(1, self.n_circuits, 1, 1)  # [sender, row, pos, d]
        # current - corrupted output of each sender, filled in as the forward reaches it (`read` of them so far)
        self.differences = torch.empty_like(self.senders_corrupt)
        self.read = 0
        self.inputs: dict[str, torch.Tensor] = {}
        self.receivers_per_layer = (len(graph.receivers) - 1) // graph.n_layers

    def interventions(self) -> dict[str, Callable]:
        g, model = self.graph, self.model
        result = {"blocks.0.hook_resid_pre": self._embed}
        for layer in range(g.n_layers):
            result[f"blocks.{layer}.hook_resid_pre"] = self._stack(result.get(f"blocks.{layer}.hook_resid_pre"), f"pre{layer}")
            for part in "qkv":
                result[f"blocks.{layer}.attn.hook_{part}"] = self._head_input(layer, part)
            result[f"blocks.{layer}.attn.hook_z"] = self._heads_written(layer)
            mlp_reads = ln2_input(model, layer)
            if mlp_reads.endswith("hook_resid_mid"):
                result[mlp_reads] = self._stack(None, f"mid{layer}")
            result[f"blocks.{layer}.ln2.hook_normalized"] = self._mlp_input(layer)
            result[f"blocks.{layer}.hook_mlp_out"] = self._mlp_written(layer)
        result[f"blocks.{g.n_layers - 1}.hook_resid_post"] = self._logits_input
        return result

    def _rows(self, name: str) -> torch.Tensor:
        """The corrupted run's value at `name`, repeated for every circuit of the forward."""
        value = self.corrupted[name]
        return value.repeat(self.n_circuits, *([1] * (value.dim() - 1)))

    def _embed(self, x, hook):
        torch.sub(x, self.senders_corrupt[0], out=self.differences[0])
        self.read = 1
        self.inputs["pre0"] = x

    def _stack(self, first, key: str):
        def keep(x, hook):
            if first is not None:
                first(x, hook)
            self.inputs[key] = x

        return keep

    def _receiver_inputs(self, x: torch.Tensor, receivers: range) -> torch.Tensor:
        """Each receiver's input `[receiver, row, pos, d]`: the current residual stream `x` minus the differences of
        the senders whose edges to it are cut (the callers give a receiver with every edge cut the corrupted run's
        own value instead, so that it is bit-identical)."""
        differences = self.differences[: self.read]  # [sender so far, row, pos, d]
        cut = self.cut[:, : len(differences), receivers.start : receivers.stop]  # [row, sender, receiver]
        return x - torch.einsum("snpd,nsr->rnpd", differences, cut)

    def _head_input(self, layer: int, part: str):
        g = self.graph
        n_heads, n_kv = g.n_heads, g.n_kv_heads
        base = layer * self.receivers_per_layer
        if g.qkv:
            offset = {"q": 0, "k": n_heads, "v": n_heads + n_kv}[part]
            receivers = range(base + offset, base + offset + (n_heads if part == "q" else n_kv))
        else:
            receivers = range(base, base + n_heads)
        attn = self.model.weights.blocks[layer].attn
        weight = {"q": attn.W_Q, "k": attn._W_K, "v": attn._W_V}[part]
        bias = {"q": attn.b_Q, "k": attn._b_K, "v": attn._b_V}[part]
        norm = self.model._points[f"blocks.{layer}.ln1.hook_normalized"].module

        def write(current, hook):  # current: [row, pos, head, d_head]
            cut = self.cut_any[:, receivers.start : receivers.stop]  # [row, head]
            if not cut.any():
                return None
            inputs = self._receiver_inputs(self.inputs[f"pre{layer}"], receivers)
            computed = torch.einsum("hnpd,hdk->nphk", norm.forward(inputs), weight.to(inputs)) + bias.to(inputs)
            every_cut = ~self.kept_any[:, receivers.start : receivers.stop]
            computed = torch.where(every_cut[:, None, :, None], self._rows(f"blocks.{layer}.attn.hook_{part}"), computed)
            return torch.where(cut[:, None, :, None], computed, current)

        return write

    def _heads_written(self, layer: int):
        W_O = self.model.weights.blocks[layer].attn.W_O
        first = 1 + layer * (self.graph.n_heads + 1)

        def read(z, hook):
            results = torch.einsum("nphk,hkd->hnpd", z, W_O.to(z))
            last = first + self.graph.n_heads
            torch.sub(results, self.senders_corrupt[first:last], out=self.differences[first:last])
            self.read = last

        return read

    def _mlp_input(self, layer: int):
        receiver = layer * self.receivers_per_layer + self.receivers_per_layer - 1
        norm = self.model._points[f"blocks.{layer}.ln2.hook_normalized"].module
        key = f"mid{layer}" if ln2_input(self.model, layer).endswith("hook_resid_mid") else f"pre{layer}"

        def write(current, hook):
            cut = self.cut_any[:, receiver]
            if not cut.any():
                return None
            computed = norm.forward(self._receiver_inputs(self.inputs[key], range(receiver, receiver + 1))[0])  # not norm(...): its own hooks would run again
            every_cut = ~self.kept_any[:, receiver]
            computed = torch.where(every_cut[:, None, None], self._rows(f"blocks.{layer}.ln2.hook_normalized"), computed)
            return torch.where(cut[:, None, None], computed, current)

        return write

    def _mlp_written(self, layer: int):
        index = (layer + 1) * (self.graph.n_heads + 1)

        def read(out, hook):
            torch.sub(out, self.senders_corrupt[index], out=self.differences[index])
            self.read = index + 1

        return read

    def _logits_input(self, x, hook):
        receiver = len(self.graph.receivers) - 1
        cut = self.cut_any[:, receiver]
        if not cut.any():
            return None
        computed = self._receiver_inputs(x, range(receiver, receiver + 1))[0]
        every_cut = ~self.kept_any[:, receiver]
        computed = torch.where(every_cut[:, None, None], self._rows(f"blocks.{self.graph.n_layers - 1}.hook_resid_post"), computed)
        return torch.where(cut[:, None, None], computed, x)
