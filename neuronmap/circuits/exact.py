"""Exact edge patching: run the clean prompts with only a circuit's edges carrying clean activations.

Every edge outside the circuit carries the corrupted run's value instead (the corrupted prompts', or a mean or
resample ablation's: see `ablation`): a receiver's input is the residual
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
    names = [f"blocks.{layers - 1}.hook_resid_post"]
    for layer in range(layers):
        names += [f"blocks.{layer}.hook_resid_pre", *sorted({ln2_input(model, layer)} - {f"blocks.{layer}.hook_resid_pre"})]
        names += [f"blocks.{layer}.attn.hook_{part}" for part in ("q", "k", "v", "z")]
        names += [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.ln2.hook_normalized"]
    return names


class _Patched:
    """The interventions of one stacked forward whose rows (circuit-major, prompts within) each carry a circuit.

    In each circuit a receiver with every edge kept reads the current residual stream (left alone), one with every
    edge cut reads the corrupted run's input (its value copied, bit for bit), and only a receiver with both is
    rebuilt, from whichever side has fewer senders: the corrupted input plus the kept senders' differences, or the
    current input minus the cut ones' (the residual stream is the senders' outputs plus constant biases, so both
    are the same sum). That is one matrix product per circuit and group of receivers, over the senders it needs.
    """

    def __init__(self, model, graph: Graph, masks: torch.Tensor, corrupted, senders_corrupt: torch.Tensor, n_prompts: int):
        self.model, self.graph, self.corrupted = model, graph, corrupted
        self.n_circuits, self.n_prompts = len(masks), n_prompts
        self.senders_corrupt = senders_corrupt  # [sender, prompt, pos, d]
        self.receivers_per_layer = (len(graph.receivers) - 1) // graph.n_layers
        self.plans = {group: _plans(graph, masks[:, :, group.start : group.stop], group, *bases)
                      for group, bases in self._groups().items()}
        needed = torch.zeros(len(graph.senders), dtype=torch.bool)
        for plans in self.plans.values():
            for plan in plans:
                if plan.senders is not None:
                    needed[plan.senders] = True
        self.needed = needed.tolist()
        # current - corrupted output of each needed sender, filled in as the forward reaches it
        self.differences = senders_corrupt.new_empty(len(graph.senders), self.n_circuits, *senders_corrupt.shape[1:])
        self.inputs: dict[str, torch.Tensor] = {}

    def _groups(self) -> dict[range, tuple[str, str]]:
        """The receivers rebuilt together (each layer's query, key and value heads, or its heads with q/k/v merged;
        its MLP; the logits), each with the corrupted run's hook point and the current input's key they read."""
        g, groups = self.graph, {}
        for layer in range(g.n_layers):
            base = layer * self.receivers_per_layer
            heads = (f"blocks.{layer}.hook_resid_pre", f"pre{layer}")
            if g.qkv:
                for start, size in ((0, g.n_heads), (g.n_heads, g.n_kv_heads), (g.n_heads + g.n_kv_heads, g.n_kv_heads)):
                    groups[range(base + start, base + start + size)] = heads
            else:
                groups[range(base, base + g.n_heads)] = heads
            mlp_reads = ln2_input(self.model, layer)
            key = f"mid{layer}" if mlp_reads.endswith("hook_resid_mid") else f"pre{layer}"
            groups[range(base + self.receivers_per_layer - 1, base + self.receivers_per_layer)] = (mlp_reads, key)
        groups[range(len(g.receivers) - 1, len(g.receivers))] = (f"blocks.{g.n_layers - 1}.hook_resid_post", "logits")
        return groups

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

    def _circuits(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (rows first) as `[circuit, prompt, ...]`."""
        return x.view(self.n_circuits, self.n_prompts, *x.shape[1:])

    def _write_differences(self, first: int, outputs: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """The differences of the senders from `first` on (or `first + index`) from their current `outputs`
        `[sender, row, pos, d]`."""
        outputs = outputs.view(len(outputs), self.n_circuits, *self.senders_corrupt.shape[1:])
        if index is None:
            senders = slice(first, first + len(outputs))
            torch.sub(outputs, self.senders_corrupt[senders, None], out=self.differences[senders])
        else:
            self.differences[first + index] = outputs - self.senders_corrupt[first + index, None]

    def _embed(self, x, hook):
        self._write_differences(0, x[None])
        self.inputs["pre0"] = x

    def _stack(self, first, key: str):
        def keep(x, hook):
            if first is not None:
                first(x, hook)
            self.inputs[key] = x

        return keep

    def _rebuild(self, group: range, current: torch.Tensor, corrupted: torch.Tensor, compute: Callable) -> torch.Tensor | None:
        """`current` (a receiver group's value, rows first, the group along `dim` 2 or absent for one receiver) with
        each circuit's every-cut receivers set to the `corrupted` run's value and its mixed ones to `compute(inputs,
        receivers)` of their rebuilt inputs `[receiver, prompt, pos, d]`; None when no circuit changes anything."""
        plans = self.plans[group]
        if all(plan.all_kept for plan in plans):
            return None
        rows = self._circuits(current)
        one = current.dim() == 3  # one receiver: no group dimension
        for c, plan in enumerate(plans):
            if plan.every_cut is not None:
                if one:
                    rows[c] = corrupted
                else:
                    rows[c][:, :, plan.every_cut] = corrupted[:, :, plan.every_cut]
            if plan.mixed is not None:
                computed = compute(self._inputs_of(plan, c), plan.mixed)
                if one:
                    rows[c] = computed[0]
                else:
                    rows[c][:, :, plan.mixed] = computed
        return current

    def _inputs_of(self, plan: _Plan, circuit: int) -> torch.Tensor:
        """The rebuilt inputs `[receiver, prompt, pos, d]` of a plan's mixed receivers in one circuit."""
        differences = self.differences[:, circuit].index_select(0, plan.senders)
        products = (plan.weights.to(differences) @ differences.flatten(1)).view(len(plan.weights), *differences.shape[1:])
        if plan.from_corrupted:
            return self.corrupted[plan.base] + products
        return self._circuits(self.inputs[plan.base])[circuit] - products

    def _head_input(self, layer: int, part: str):
        g = self.graph
        base = layer * self.receivers_per_layer
        if g.qkv:
            offset = {"q": 0, "k": g.n_heads, "v": g.n_heads + g.n_kv_heads}[part]
            group = range(base + offset, base + offset + (g.n_heads if part == "q" else g.n_kv_heads))
        else:
            group = range(base, base + g.n_heads)
        attn = self.model.weights.blocks[layer].attn
        weight = {"q": attn.W_Q, "k": attn._W_K, "v": attn._W_V}[part]
        bias = {"q": attn.b_Q, "k": attn._b_K, "v": attn._b_V}[part]
        norm = self.model._points[f"blocks.{layer}.ln1.hook_normalized"].module
        corrupted = self.corrupted[f"blocks.{layer}.attn.hook_{part}"]

        def compute(inputs, heads):
            return torch.einsum("hnpd,hdk->nphk", norm.forward(inputs), weight[heads].to(inputs)) + bias[heads].to(inputs)

        def write(current, hook):  # current: [row, pos, head, d_head]
            return self._rebuild(group, current, corrupted, compute)

        return write

    def _heads_written(self, layer: int):
        W_O = self.model.weights.blocks[layer].attn.W_O
        n_heads = self.graph.n_heads
        first = 1 + layer * (n_heads + 1)
        heads = [h for h in range(n_heads) if self.needed[first + h]]
        index = None if len(heads) == n_heads else torch.tensor(heads, device=W_O.device)

        def read(z, hook):
            if index is None:
                self._write_differences(first, torch.einsum("nphk,hkd->hnpd", z, W_O.to(z)))
            else:
                self._write_differences(first, torch.einsum("nphk,hkd->hnpd", z[:, :, index], W_O[index].to(z)), index)

        return read if heads else (lambda z, hook: None)

    def _mlp_input(self, layer: int):
        group = range(layer * self.receivers_per_layer + self.receivers_per_layer - 1, (layer + 1) * self.receivers_per_layer)
        norm = self.model._points[f"blocks.{layer}.ln2.hook_normalized"].module
        corrupted = self.corrupted[f"blocks.{layer}.ln2.hook_normalized"]

        def write(current, hook):
            return self._rebuild(group, current, corrupted, lambda inputs, _: norm.forward(inputs))  # not norm(...): its own hooks would run again

        return write

    def _mlp_written(self, layer: int):
        index = (layer + 1) * (self.graph.n_heads + 1)

        def read(out, hook):
            if self.needed[index]:
                self._write_differences(index, out[None])

        return read

    def _logits_input(self, x, hook):
        g = self.graph
        self.inputs["logits"] = x
        group = range(len(g.receivers) - 1, len(g.receivers))
        return self._rebuild(group, x, self.corrupted[f"blocks.{g.n_layers - 1}.hook_resid_post"], lambda inputs, _: inputs)


class _Plan:
    """What one circuit does to one group of receivers: the receivers whose every edge is cut (`every_cut`), those
    with kept and cut edges (`mixed`), rebuilt from the `senders` whose differences they add (`from_corrupted`:
    to the corrupted run's input at hook point `base`) or subtract (from the current input, kept under key `base`),
    with `weights` `[mixed receiver, sender]` saying which sender reaches which receiver."""

    def __init__(self, every_cut, mixed, senders, weights, from_corrupted: bool, base: str | None):
        self.every_cut, self.mixed, self.senders, self.weights = every_cut, mixed, senders, weights
        self.from_corrupted, self.base = from_corrupted, base
        self.all_kept = every_cut is None and mixed is None


def _plans(graph: Graph, kept: torch.Tensor, group: range, corrupted_base: str, current_base: str) -> list[_Plan]:
    """Each circuit's `_Plan` for the receivers `group` (`kept`: `[circuit, sender, receiver of the group]`), whose
    input is the corrupted run's value at `corrupted_base` and the current one kept under `current_base`."""
    valid = graph.valid[:, group.start : group.stop]
    kept = kept.cpu() & valid
    cut = valid & ~kept
    kept_any, cut_any = kept.any(1), cut.any(1)  # [circuit, receiver]
    plans = []
    for c in range(len(kept)):
        every = (~kept_any[c]).nonzero().flatten()
        every = every if len(every) else None
        mixed = (kept_any[c] & cut_any[c]).nonzero().flatten()
        if not len(mixed):
            plans.append(_Plan(every, None, None, None, False, None))
            continue
        from_kept, from_cut = kept[c][:, mixed], cut[c][:, mixed]
        kept_senders, cut_senders = from_kept.any(1).nonzero().flatten(), from_cut.any(1).nonzero().flatten()
        use_kept = len(kept_senders) <= len(cut_senders)
        senders = kept_senders if use_kept else cut_senders
        weights = (from_kept if use_kept else from_cut)[senders].T.float()
        plans.append(_Plan(every, mixed, senders, weights, use_kept, corrupted_base if use_kept else current_base))
    return plans
