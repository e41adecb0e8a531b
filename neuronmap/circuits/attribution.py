"""Edge attribution patching (EAP) and its integrated-gradients forms (EAP-IG): a score for every edge of the graph.

The score of an edge (sender u -> receiver v) estimates how much the metric moves when v reads u's clean output
instead of its corrupted one, to first order: (clean - corrupted output of u) . (gradient of the metric at v's
input, on the corrupted run). Every edge's score comes from one clean forward and one corrupted forward and
backward (EAP, Syed et al. 2023). EAP-IG (Hanna et al. 2024) averages the gradients over `steps` points on a path
from the corrupted run towards the clean one (a left Riemann sum: the first point is the corrupted run, so
`steps=1` is EAP):

- `ig="inputs"`: the input embeddings move from the corrupted prompts' towards the clean ones'; `steps` stacked
  forward and backward passes in all. It needs corrupted prompts (a mean ablation has no corrupted embeddings).
- `ig="activations"`: each layer's senders in turn (the embeddings, a layer's heads, a layer's MLP) have their
  outputs moved from corrupted towards clean, the rest of the corrupted run answering; an edge's gradient is the
  average over its own sender's path. The first point is shared, so it takes 1 + (steps - 1) x (2 x layers + 1)
  passes, each backward stopping at the interpolated layer (about half a pass on average, past the first).

A receiver's input is a norm of the residual stream followed by its own weights (a head's query, key or value
projection, the MLP, the unembedding). Its gradient is read where the weights start (`attn.hook_q|k|v`,
`ln2.hook_normalized`, the final residual stream), mapped back through those weights and the norm's Jacobian
(`torch.func.vjp` of the model's own norm module), so one backward serves every receiver. Scores are then one
matrix product per layer of receivers. Stacked passes are cut into chunks of rows whose estimated activation memory
stays within `memory_budget`; the gradients of the chunks add up to those of the whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..inputs import Batch, token_strings
from ..patching.metrics import Context, Metric, as_metric
from .ablation import Ablation, Corruption, corruption, sender_hooks
from .components import check_family, frozen, last_only, ln2_input, logits_reader, sender_outputs, traced_run
from .graph import Graph, graph as make_graph
from .result import CircuitGraph

IG = ("inputs", "activations")
MEMORY_BUDGET = 1 << 30
"""Bytes of activations (estimated) one stacked forward and backward may hold, by default."""

ROW_COST = {"width": 24, "inner": 4, "attention": 4, "vocab": 3}
"""Floats per row of a stacked forward and backward with its scoring: per layer and token, times the model width,
the MLP width, and heads x tokens (attention weights); and per logit kept. Measured on a GPT-2-small-sized model
(CPU, 20 tokens): the resident set grows by about 30 MB a row, which these give."""


def eap(
    model,
    clean,
    corrupt,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int = 1,
    ig: str = "inputs",
    qkv: bool = True,
    per_position: bool = False,
    memory_budget: int = MEMORY_BUDGET,
) -> CircuitGraph:
    """Score every edge of `model`'s graph for how much it carries the difference between `clean` and `corrupt`
    (corrupted prompts, `mean_ablation(...)` or `resample_ablation(...)`): EAP, or EAP-IG with `steps` > 1 on the
    input embeddings (`ig="inputs"`) or on every layer's activations (`ig="activations"`, about 2 x layers times
    the passes).

    `metric` as for `nm.patch` (it must be differentiable); scores are normalised so that 1 is the whole clean -
    corrupted difference. `qkv`: a head's query, key and value inputs are separate receivers; `per_position`:
    score each edge at each token position. `memory_budget`: bytes of activations one stacked pass may hold.
    """
    from ..model import Model, load

    model = model if isinstance(model, Model) else load(model)
    check_family(model)
    clean_batch = model._batch(clean)
    g = make_graph(model, qkv=qkv, positions=clean_batch.tokens.shape[1] if per_position else None)
    g, raw, clean_value, corrupt_value = edge_scores(model, clean, corrupt, metric, g, steps=steps, ig=ig,
                                                     memory_budget=memory_budget)
    if clean_value == corrupt_value:
        raise InputError(
            f"the metric is {clean_value:.6g} on both the clean and the corrupted run: there is no difference "
            "for the edges to carry"
        )
    method = "EAP" if steps == 1 else f"EAP-IG ({steps} steps)" if ig == "inputs" else f"EAP-IG on activations ({steps} steps)"
    if isinstance(corrupt, Ablation):
        method += f", {corrupt!r}"
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
    ig: str = "inputs",
    memory_budget: int = MEMORY_BUDGET,
) -> tuple[Graph, torch.Tensor, float, float]:
    """EAP (`steps=1`) or EAP-IG scores `[sender, receiver]` (`[position, sender, receiver]` when `graph` keeps
    positions) of the raw metric, zero where there is no edge; and the metric's mean on the clean and corrupted
    runs."""
    check_family(model)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {steps!r}")
    if ig not in IG:
        raise InputError(f"ig must be one of {IG} (what EAP-IG interpolates), not {ig!r}")
    if not isinstance(memory_budget, int) or memory_budget < 1:
        raise InputError(f"memory_budget must be a number of bytes, got {memory_budget!r}")
    graph = graph or make_graph(model)
    clean_batch, corrupted = corruption(model, clean, corrupt, graph.n_layers)
    if graph.positions is not None and graph.positions != clean_batch.tokens.shape[1]:
        raise InputError(f"the graph keeps {graph.positions} positions but the prompts have {clean_batch.tokens.shape[1]}")
    if ig == "inputs" and steps > 1 and corrupted.means is not None:
        raise InputError(
            "EAP-IG on inputs moves the input embeddings from the corrupted prompts' to the clean ones', and a mean "
            "ablation has no corrupted prompts: use ig='activations'"
        )
    attribution = _Attribution(model, graph, as_metric(metric), clean_batch, corrupted, steps, memory_budget)
    with frozen(model.module):
        attribution.corrupted_run()
        if ig == "inputs":
            attribution.inputs_path()
        else:
            attribution.activations_path()
    return graph, attribution.scores * graph.valid, attribution.clean_value, attribution.corrupt_value


class _Attribution:
    """The passes of one EAP or EAP-IG computation and the scores they add up to.

    A pass is a stacked forward and backward whose rows are (point on the path, prompt) pairs; each row adds its
    receivers' gradients, dotted with its prompt's sender differences, to the scores of the senders it stands for.
    """

    def __init__(self, model, graph: Graph, metric: Metric, clean: Batch, corrupted: Corruption, steps: int,
                 memory_budget: int):
        self.model, self.graph, self.corrupted, self.steps, self.metric = model, graph, corrupted, steps, metric
        self.n = clean.tokens.shape[0]
        self.hooks = sender_hooks(graph.n_layers)
        self.trim = last_only(model, metric, clean)
        with torch.no_grad():
            self.clean = traced_run(model, clean, capture=[*self.hooks, "hook_embed"], last=self.trim)
        prompts = torch.arange(self.n, device=model.device)
        last = clean.last_positions.to(model.device)
        self.at = logits_reader(metric, last, self.trim)
        clean_logits = self.at(self.clean.logits, prompts)
        self.evaluate = metric.bind(Context(clean.tokens, clean.attention_mask, last, clean_logits, model))
        self.clean_value = float(self.evaluate(clean_logits, prompts).float().mean())
        unit = 1 if metric.row_wise else self.n  # a metric of whole runs sees whole runs
        rows = memory_budget // _row_bytes(model, clean.tokens.shape[1], 1 if self.trim else clean.tokens.shape[1])
        self.chunk = max(unit, rows // unit * unit)
        shape = (len(graph.senders), len(graph.receivers))
        dtype = self.clean["blocks.0.hook_resid_pre"].dtype
        self.scores = torch.zeros((graph.positions, *shape) if graph.positions else shape, dtype=dtype, device=model.device)
        self.corrupt_value = float("nan")
        self.deltas: torch.Tensor | None = None  # clean - corrupted output of every sender [sender, prompt, pos, d]
        self.corrupt_hooks: dict[str, torch.Tensor] = {}  # the corrupted run's value at every sender hook point

    def corrupted_run(self) -> None:
        """The first point of every path: the corrupted run, scoring every edge (EAP)."""
        values = torch.empty(self.n, device=self.model.device)
        means = self.corrupted.means
        if means is not None:
            self.corrupt_hooks = means
            self.deltas = sender_outputs(self.model, self.clean, self.graph, minus=means)
        parts = []
        for start in range(0, self.n, self.chunk):
            rows = slice(start, start + self.chunk)
            prompts = torch.arange(self.n, device=self.model.device)[rows]
            run, values[rows] = self._pass(prompts, self.corrupted.interventions(), 0,
                                           capture=self.hooks if means is None else ())
            if means is None:
                for name in self.hooks:
                    self.corrupt_hooks.setdefault(name, torch.empty_like(self.clean[name]))[rows] = run[name]
                parts.append(sender_outputs(self.model, {name: self.clean[name][rows] for name in self.hooks}, self.graph,
                                            minus=run))
            self._add(run, prompts, slice(0, len(self.graph.senders)), 0, parts[-1] if parts else None)
            del run  # before the next pass
        if parts:
            self.deltas = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        self.corrupt_value = float(values.mean())

    def inputs_path(self) -> None:
        """Points 1 .. steps - 1 of the path of the input embeddings."""
        if self.steps == 1:
            return
        embed = self.model._points["hook_embed"].module
        with torch.no_grad():
            shift = self.clean["hook_embed"] - embed(self.corrupted.batch.tokens)
        for prompts, alphas in self._rows():
            interventions = {"hook_embed": lambda x, hook, a=alphas, p=prompts: x + _along(a, x) * shift[p]}
            run, _ = self._pass(prompts, interventions, 0)
            self._add(run, prompts, slice(0, len(self.graph.senders)), 0)
            del run

    def activations_path(self) -> None:
        """Points 1 .. steps - 1 of each layer's senders' path, the other senders corrupted."""
        if self.steps == 1:
            return
        g = self.graph
        for index, name in enumerate(self.hooks):
            if index == 0:
                senders, first = slice(0, 1), 0
            else:
                layer, is_mlp = (index - 1) // 2, index % 2 == 0
                start = 1 + layer * (g.n_heads + 1)
                senders = slice(start + g.n_heads, start + g.n_heads + 1) if is_mlp else slice(start, start + g.n_heads)
                first = int(g.valid[senders.start].nonzero()[0])  # the first receiver the senders feed
            clean, corrupt = self.clean[name], self.corrupt_hooks[name]
            for prompts, alphas in self._rows():
                def move(x, hook, a=alphas, p=prompts, per_prompt=self.corrupted.means is None):
                    start = corrupt[p] if per_prompt else corrupt
                    return start + _along(a, x) * (clean[p] - start)

                interventions = {**self.corrupted.interventions(leave=name), name: move}
                run, _ = self._pass(prompts, interventions, first)
                self._add(run, prompts, senders, first)
                del run

    def _rows(self):
        """The rows of points 1 .. steps - 1 in chunks: (prompt of each row, its point's fraction of the path)."""
        points = torch.arange(1, self.steps, device=self.model.device)
        prompts = torch.arange(self.n, device=self.model.device).repeat(self.steps - 1)
        alphas = (points.to(self.scores.dtype) / self.steps).repeat_interleave(self.n)
        return zip(prompts.split(self.chunk), alphas.split(self.chunk))

    def _pass(self, prompts: torch.Tensor, interventions: dict, first: int, capture=()):
        """A forward and backward of the corrupted run's `prompts` under `interventions`, reading the gradient at
        every receiver from index `first` on: the run and the metric of each row."""
        g = self.graph
        reads, norm_inputs = [], []
        for layer in self._layers(first):
            if layer == g.n_layers:
                reads.append(f"blocks.{layer - 1}.hook_resid_post")
                continue
            if self._with_heads(layer, first):
                reads += [f"blocks.{layer}.attn.hook_{part}" for part in "qkv"]
                norm_inputs.append(f"blocks.{layer}.hook_resid_pre")
            reads.append(f"blocks.{layer}.ln2.hook_normalized")
            norm_inputs.append(ln2_input(self.model, layer))
        batch = self.corrupted.batch
        rows = Batch(batch.tokens[prompts], batch.attention_mask[prompts])
        run = traced_run(self.model, rows, capture=[*capture, *norm_inputs], capture_grad=reads,
                         interventions=interventions, last=self.trim)
        value = self.evaluate(self.at(run.logits, prompts), prompts).float()
        if not value.requires_grad:
            raise InputError(
                f"the {self.metric} does not depend on the logits through autograd, so it has no gradient: use a "
                "differentiable metric, or exact patching (nm.patch, circuit_metrics), which needs none"
            )
        value.sum().div(self.n * self.steps).backward()
        return run, value.detach()

    def _layers(self, first: int) -> range:
        per_layer = (len(self.graph.receivers) - 1) // self.graph.n_layers
        return range(first // per_layer, self.graph.n_layers + 1)

    def _with_heads(self, layer: int, first: int) -> bool:
        per_layer = (len(self.graph.receivers) - 1) // self.graph.n_layers
        return layer * per_layer >= first

    def _add(self, run, prompts: torch.Tensor, senders: slice, first: int, deltas: torch.Tensor | None = None) -> None:
        """Add each receiver's gradient in `run` (rows of `prompts`), summed per prompt, against the differences of
        `senders` (`deltas` of the prompts present, else `self.deltas`), to their scores: a matrix product per layer
        of heads (over the senders that reach them), and one for every MLP and the logits together (over all of
        `senders`; what reaches no receiver is no edge)."""
        present, inverse = prompts.unique(return_inverse=True)
        one_each = torch.equal(prompts, present)  # each prompt's row once, in order: nothing to sum
        if deltas is None:
            deltas = self.deltas if len(present) == self.n else self.deltas[:, present]
        per_position = self.graph.positions is not None

        def per_prompt(gradients: torch.Tensor) -> torch.Tensor:
            if one_each:
                return gradients
            return gradients.new_zeros(len(gradients), len(present), *gradients.shape[2:]).index_add_(1, inverse, gradients)

        singles, columns = [], []
        with torch.no_grad():
            for layer in self._layers(first):
                groups = _receiver_gradients(self.model, self.graph, run, layer, self._with_heads(layer, first))
                for group, gradients in groups:
                    if len(group) == 1:  # an MLP or the logits: gathered for one product
                        singles.append(per_prompt(gradients))
                        columns.append(group.start)
                        continue
                    reach = slice(senders.start, min(senders.stop, int(self.graph.valid[:, group.start].sum())))
                    if reach.start < reach.stop:
                        self.scores[..., reach, group] += _products(deltas[reach], per_prompt(gradients), per_position)
            self.scores[..., senders, columns] += _products(deltas[senders], torch.cat(singles), per_position)


def _products(deltas: torch.Tensor, gradients: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Every sender's difference `[sender, prompt, pos, d]` dotted with every receiver's gradient (same shape),
    summed over prompts, positions (unless `per_position`) and the model dimension."""
    n_senders, prompts, length, width = deltas.shape
    if per_position:
        flat = deltas.permute(2, 0, 1, 3).reshape(length, n_senders, prompts * width)
        return flat @ gradients.permute(2, 0, 1, 3).reshape(length, -1, prompts * width).transpose(1, 2)
    return deltas.reshape(n_senders, -1) @ gradients.reshape(len(gradients), -1).T


def _receiver_gradients(model, graph: Graph, run, layer: int, heads: bool = True) -> list[tuple[range, torch.Tensor]]:
    """The gradient of the metric at each receiver's input in `layer` (the logits for the last layer + 1), by group
    of receivers: the layer's heads (their query, key and value inputs, or with q/k/v merged the heads), then its MLP
    (alone unless `heads`); each as (its columns in `graph.receivers`, `[receiver, rows, pos, d_model]`)."""
    if layer == graph.n_layers:
        return [(range(len(graph.receivers) - 1, len(graph.receivers)), run.grad(f"blocks.{layer - 1}.hook_resid_post")[None])]
    per_layer = (len(graph.receivers) - 1) // graph.n_layers
    ln2 = model._points[f"blocks.{layer}.ln2.hook_normalized"].module
    mlp = _through_norm(ln2, run[ln2_input(model, layer)], run.grad(f"blocks.{layer}.ln2.hook_normalized")[:, :, None])
    groups = [(range((layer + 1) * per_layer - 1, (layer + 1) * per_layer), mlp)]
    if not heads:
        return groups
    attn = model.weights.blocks[layer].attn
    parts = [run.grad(f"blocks.{layer}.attn.hook_{part}") for part in "qkv"]  # [rows, pos, head, d_head]
    weights = [attn.W_Q, attn._W_K, attn._W_V]  # [head, d_model, d_head]
    if graph.qkv:  # every head's query, key and value side by side
        gradients, weights = torch.cat(parts, 2), torch.cat(weights)
    else:  # each head's query, key and value inputs summed: their gradients and weights along d_head
        gradients, weights = torch.cat(parts, 3), torch.cat(weights, 2)
    ln1 = model._points[f"blocks.{layer}.ln1.hook_normalized"].module
    through = _through_norm(ln1, run[f"blocks.{layer}.hook_resid_pre"], gradients, weights)
    return [(range(layer * per_layer, layer * per_layer + len(through)), through), *groups]


def _through_norm(norm: torch.nn.Module, x: torch.Tensor, gradients: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Gradients at the outputs of receivers reading `norm(x)` through `weights` (`gradients` `[rows, pos,
    receiver, k]`, `weights` `[receiver, d_model, k]`; without weights, gradients at `norm(x)` itself, k = d_model),
    taken back to `x`: `[receiver, rows, pos, d_model]`.

    For a LayerNorm or an RMSNorm (checked against the module's own output) by their closed form, which folds the
    norm's gain and centring into `weights` and its scale into `gradients`, so that the Jacobian costs one pass
    over the result more than the product through the weights; else by `torch.func.vjp` of the norm module."""
    form = _norm_form(norm, x)
    if form is None:
        through = gradients.movedim(2, 0) if weights is None else torch.einsum("bprk,rdk->rbpd", gradients, weights.to(gradients))
        _, pullback = torch.func.vjp(norm.forward, x.detach())
        return torch.vmap(lambda g: pullback(g)[0])(through)
    centred, gain, eps = form
    x = x.detach().float()
    if centred:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.square().mean(-1, keepdim=True) + eps).rsqrt()
    normalized = x * scale
    scaled = gradients.float() * scale[..., None]
    if weights is None:  # the gradients at the norm's output: the gain and centring applied to them
        through = (scaled * gain.float() if gain is not None else scaled).movedim(2, 0)
        if centred:
            through = through - through.mean(-1, keepdim=True)
        along = (through * normalized).mean(-1)
    else:  # the gain and centring folded into the weights' columns
        weights = weights.float() * gain.float()[None, :, None] if gain is not None else weights.float()
        if centred:
            weights = weights - weights.mean(1, keepdim=True)
        through = torch.einsum("bprk,rdk->rbpd", scaled, weights)
        along = torch.einsum("rbpd,bpd->rbp", through, normalized) / x.shape[-1]
    return through.addcmul_(along[..., None], normalized[None], value=-1).to(gradients.dtype)


def _norm_form(norm: torch.nn.Module, x: torch.Tensor) -> tuple[bool, torch.Tensor | None, float] | None:
    """(centred, gain, eps) when `norm` computes a LayerNorm (centred) or an RMSNorm over the model dimension with an
    elementwise gain, as its output on `x` confirms; else None."""
    if isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1:
        centred, eps = True, norm.eps
    elif isinstance(getattr(norm, "variance_epsilon", None), float):
        centred, eps = False, norm.variance_epsilon
    else:
        return None
    gain = getattr(norm, "weight", None)
    with torch.no_grad():
        value = x.float() - x.float().mean(-1, keepdim=True) if centred else x.float()
        expected = value * (value.square().mean(-1, keepdim=True) + eps).rsqrt() * (gain.float() if gain is not None else 1)
        if getattr(norm, "bias", None) is not None:
            expected = expected + norm.bias.float()
        actual = norm.forward(x).float()
    if not torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        return None
    return centred, gain, eps


def _along(alphas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's fraction `alphas` shaped to scale rows of `x`."""
    return alphas.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))


def _row_bytes(model, length: int, kept: int) -> int:
    """An estimate of the memory one row of a stacked forward and backward holds: the activations autograd keeps
    and the captures, per layer and token, and the logits of the `kept` positions (with their gradient)."""
    config = model._config
    width = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width
    heads = config.num_attention_heads
    per_token = config.num_hidden_layers * (ROW_COST["width"] * width + ROW_COST["inner"] * inner
                                            + ROW_COST["attention"] * heads * length)
    elements = length * per_token + ROW_COST["vocab"] * kept * config.vocab_size
    return elements * 4

