"""Edge attribution patching (EAP) and its integrated-gradients form (EAP-IG): a score for every edge of the graph.

The score of an edge (sender u -> receiver v) estimates how much the metric moves when v reads u's clean output
instead of its corrupted one, to first order: (clean - corrupted output of u) . (gradient of the metric at v's
input, on the corrupted run). Every edge's score comes from one clean forward and one corrupted forward and
backward (EAP, Syed et al. 2023); EAP-IG (Hanna et al. 2024) averages the gradients over `steps` runs whose input
embeddings move from the corrupted prompts' towards the clean ones' (a left Riemann sum, so `steps=1` is EAP).

A receiver's input is a norm of the residual stream followed by its own weights (a head's query, key or value
projection, the MLP, the unembedding). Its gradient is read where the weights start (`attn.hook_q|k|v`,
`ln2.hook_normalized`, the final residual stream), mapped back through those weights and the norm's Jacobian
(`torch.func.vjp` of the model's own norm module), so one backward serves every receiver. Scores are then one
matrix product per layer of receivers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..inputs import Batch, token_strings
from ..patching.metrics import Context, Metric, as_metric
from ..patching.sweep import paired
from .components import check_family, frozen, last_only, ln2_input, logits_reader, sender_outputs, traced_run
from .graph import Graph, graph as make_graph
from .result import CircuitGraph

def eap(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int = 1,
    qkv: bool = True,
    per_position: bool = False,
) -> CircuitGraph:
    """Score every edge of `model`'s graph for how much it carries the difference between `clean` and `corrupt`:
    EAP, or EAP-IG with `steps` > 1 (gradients averaged over input embeddings moving from corrupted to clean).

    `metric` as for `nm.patch` (it must be differentiable); scores are normalised so that 1 is the whole clean -
    corrupted difference. `qkv`: a head's query, key and value inputs are separate receivers; `per_position`:
    score each edge at each token position.
    """
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    check_family(model)
    clean_batch = model._batch(clean)
    g = make_graph(model, qkv=qkv, positions=clean_batch.tokens.shape[1] if per_position else None)
    g, raw, clean_value, corrupt_value = edge_scores(model, clean, corrupt, metric, g, steps=steps)
    if clean_value == corrupt_value:
        raise InputError(
            f"the metric is {clean_value:.6g} on both the clean and the corrupted prompts: there is no difference "
            "for the edges to carry"
        )
    method = "EAP" if steps == 1 else f"EAP-IG ({steps} steps)"
    labels = token_strings(model.tokenizer, clean_batch.tokens[0].tolist())
    return CircuitGraph(g, raw.cpu(), clean_value, corrupt_value, method=method, metric=str(as_metric(metric)),
                        labels=labels, source=(model, clean, corrupt, metric))


def edge_scores(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    graph: Graph | None = None,
    *,
    steps: int = 1,
) -> tuple[Graph, torch.Tensor, float, float]:
    """EAP (`steps=1`) or EAP-IG scores `[sender, receiver]` (`[position, sender, receiver]` when `graph` keeps
    positions) of the raw metric, zero where there is no edge; and the metric's mean on the clean and corrupted
    prompts."""
    check_family(model)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {steps!r}")
    graph = graph or make_graph(model)
    metric = as_metric(metric)
    clean_batch, corrupt_batch = paired(model, clean, corrupt)
    if graph.positions is not None and graph.positions != clean_batch.tokens.shape[1]:
        raise InputError(f"the graph keeps {graph.positions} positions but the prompts have {clean_batch.tokens.shape[1]}")
    clean_batch, corrupt_batch = clean_batch.to(model.device), corrupt_batch.to(model.device)
    n_prompts = clean_batch.tokens.shape[0]
    layers = graph.n_layers
    senders = ["blocks.0.hook_resid_pre", "hook_embed"]
    senders += [f"blocks.{layer}.attn.hook_z" for layer in range(layers)]
    senders += [f"blocks.{layer}.hook_mlp_out" for layer in range(layers)]
    trim = last_only(model, metric, clean_batch)
    with torch.no_grad():
        clean_run = traced_run(model, clean_batch, capture=senders, last=trim)
    prompts = torch.arange(n_prompts, device=model.device)
    last = clean_batch.last_positions.to(model.device)
    at = logits_reader(metric, last, n_prompts, trim)
    context = Context(clean_batch.tokens, clean_batch.attention_mask, last, at(clean_run.logits.detach()), model)
    evaluate = metric.bind(context)
    clean_value = float(evaluate(at(clean_run.logits), prompts).float().mean())

    norm_inputs = [f"blocks.{layer}.hook_resid_pre" for layer in range(layers)]
    norm_inputs += [ln2_input(model, layer) for layer in range(layers)]
    reads = [f"blocks.{layer}.attn.hook_{part}" for layer in range(layers) for part in "qkv"]
    reads += [f"blocks.{layer}.ln2.hook_normalized" for layer in range(layers)]
    reads.append(f"blocks.{layers - 1}.hook_resid_post")
    rows = prompts.repeat(steps)
    stacked = Batch(corrupt_batch.tokens.repeat(steps, 1), corrupt_batch.attention_mask.repeat(steps, 1))
    interventions = None
    if steps > 1:  # each step's input embeddings moved a fraction of the way from the corrupted to the clean ones
        with torch.no_grad():
            embed_delta = clean_run["hook_embed"] - model._points["hook_embed"].module(corrupt_batch.tokens)
        alphas = (torch.arange(steps, dtype=embed_delta.dtype, device=model.device) / steps).repeat_interleave(n_prompts)
        interventions = {"hook_embed": lambda embed, hook: embed + alphas[:, None, None] * embed_delta.repeat(steps, 1, 1)}
    with frozen(model.module):
        run = traced_run(model, stacked, capture=[*senders, *norm_inputs], capture_grad=reads,
                         interventions=interventions, last=trim)
        value = evaluate(at(run.logits), rows).float()
        if not value.requires_grad:
            raise InputError(
                f"the {metric} does not depend on the logits through autograd, so it has no gradient: use a "
                "differentiable metric, or exact patching (nm.patch), which needs none"
            )
        value.sum().div(n_prompts * steps).backward()
    corrupt_value = float(value[:n_prompts].detach().mean())

    with torch.no_grad():
        deltas = sender_outputs(model, clean_run, graph) - sender_outputs(model, run, graph, rows=n_prompts)
        scores = _scores(model, graph, deltas, run, steps)
    return graph, scores * graph.valid, clean_value, corrupt_value


def _scores(model, graph: Graph, deltas: torch.Tensor, run, steps: int) -> torch.Tensor:
    """Each receiver's input gradient (summed over the IG steps) against every sender's delta, one layer of
    receivers at a time."""
    per_position = graph.positions is not None
    n_senders, batch, length, width = deltas.shape
    flat = deltas.permute(2, 0, 1, 3).reshape(length, n_senders, batch * width) if per_position \
        else deltas.reshape(n_senders, -1)
    columns = []
    for layer in range(graph.n_layers + 1):
        gradients = _receiver_gradients(model, graph, run, layer)  # [receivers, steps * batch, pos, d]
        gradients = gradients.unflatten(1, (steps, batch)).sum(1)
        if per_position:
            columns.append(flat @ gradients.permute(2, 0, 1, 3).reshape(length, -1, batch * width).transpose(1, 2))
        else:
            columns.append(flat @ gradients.reshape(len(gradients), -1).T)
    return torch.cat(columns, dim=-1)


def _receiver_gradients(model, graph: Graph, run, layer: int) -> torch.Tensor:
    """The gradient of the metric at each receiver's input in `layer` (the logits for the last layer + 1), in the
    order of `graph.receivers`: `[receiver, rows, pos, d_model]`."""
    if layer == graph.n_layers:
        return run.grad(f"blocks.{layer - 1}.hook_resid_post")[None]
    attn = model.weights.blocks[layer].attn
    q, k, v = (run.grad(f"blocks.{layer}.attn.hook_{part}") for part in "qkv")
    through_q = torch.einsum("bphk,hdk->hbpd", q, attn.W_Q)
    through_k = torch.einsum("bphk,hdk->hbpd", k, attn._W_K)
    through_v = torch.einsum("bphk,hdk->hbpd", v, attn._W_V)
    if graph.qkv:
        heads = torch.cat([through_q, through_k, through_v])
    else:
        heads = through_q + through_k + through_v
    ln1 = model._points[f"blocks.{layer}.ln1.hook_normalized"].module
    ln2 = model._points[f"blocks.{layer}.ln2.hook_normalized"].module
    heads = _through_norm(ln1, run[f"blocks.{layer}.hook_resid_pre"], heads)
    mlp = _through_norm(ln2, run[ln2_input(model, layer)], run.grad(f"blocks.{layer}.ln2.hook_normalized")[None])
    return torch.cat([heads, mlp])


def _through_norm(norm: torch.nn.Module, x: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Gradients at the norm's output `[n, *x.shape]` taken back to its input `x` (the norm's Jacobian, transposed)."""
    _, pullback = torch.func.vjp(norm, x.detach())
    return torch.vmap(lambda g: pullback(g)[0])(gradients)
