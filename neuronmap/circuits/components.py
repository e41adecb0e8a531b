"""What the graph's senders write into the residual stream and where its receivers read it, on the HF modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import inspect

import torch

from ..capture import PositionSelection, Recorder
from ..errors import InputError
from ..inputs import Batch
from ..trace import Trace
from .graph import Graph

PRE_NORM = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"}
"""Families whose blocks read the residual stream through a norm before attention and before the MLP (pre-norm),
so that every receiver's input is a function of the residual stream alone."""


def check_family(model) -> None:
    """Refuse, before any forward, a model whose family has no pre-norm block layout the graph can be read from."""
    from ..patching.cells import n_layers

    n_layers(model)
    if model.architecture not in PRE_NORM:
        raise InputError(
            f"circuits need a pre-norm decoder whose receivers read the residual stream through a norm "
            f"(GPT-2, GPT-NeoX, Llama, Mistral, Qwen2); this model's family is {model.architecture!r}"
        )


def ln2_input(model, layer: int) -> str:
    """The hook point whose value the MLP's norm reads: the residual stream after attention, or (attention and
    MLP in parallel) the block's input."""
    mid = f"blocks.{layer}.hook_resid_mid"
    return mid if mid in model._points else f"blocks.{layer}.hook_resid_pre"


def sender_outputs(model, trace, graph: Graph, minus=None) -> torch.Tensor:
    """What each sender writes into the residual stream, `[sender, batch, pos, d_model]`, or with `minus` how much
    more than in that other run (`trace`, `minus`: runs' values at the senders' hook points, or anything indexed by
    their names; a head's output is linear in its `hook_z`, so one product serves both)."""
    def value(name: str) -> torch.Tensor:
        return trace[name] if minus is None else trace[name] - minus[name]

    embed = value("blocks.0.hook_resid_pre")
    outputs = embed.new_empty(len(graph.senders), *embed.shape)
    outputs[0] = embed
    for layer in range(graph.n_layers):
        first = 1 + layer * (graph.n_heads + 1)
        z = value(f"blocks.{layer}.attn.hook_z")
        torch.matmul(z.movedim(2, 0), model.weights.blocks[layer].attn.W_O.to(z.dtype)[:, None], out=outputs[first : first + graph.n_heads])
        outputs[first + graph.n_heads] = value(f"blocks.{layer}.hook_mlp_out")
    return outputs


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """While inside, no parameter of `module` requires a gradient (a backward computes activations' gradients only)."""
    changed = [p for p in module.parameters() if p.requires_grad]
    try:
        for parameter in changed:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in changed:
            parameter.requires_grad_(True)


def last_only(model, metric, batch: Batch) -> bool:
    """Whether runs for `metric` on `batch` need the logits of the last position only: the metric reads each
    prompt's last position, which is the last one of the batch (no right padding), and the forward can be told."""
    length = batch.tokens.shape[1]
    return (
        metric.positions == "last"
        and bool((batch.last_positions == length - 1).all())
        and "logits_to_keep" in inspect.signature(model.module.forward).parameters
    )


def traced_run(model, batch: Batch, *, capture=(), capture_grad=(), interventions=None, last: bool = False) -> Trace:
    """`model.run` on a batch already on the model's device; with `last`, the logits of the last position only (HF's
    `logits_to_keep`): the unembedding of every position is a large share of a small model's forward, and its
    backward more."""
    grad_names = frozenset(model.resolve(list(capture_grad))) if capture_grad else frozenset()
    # captures are values only (detached): one kept in the graph, downstream of a point whose gradient is recorded,
    # would close a reference cycle through autograd's hooks that Python's collector cannot see, and the run would
    # never be freed
    recorder = Recorder(PositionSelection(None, batch, batch.tokens.shape[1]), None, None, keep_graph=False,
                        grad_names=grad_names)
    actions = model._actions(model.resolve(list(capture)) if capture else [], interventions or {}, recorder)
    kwargs = {**model._forward_kwargs, **({"logits_to_keep": 1} if last else {})}
    with model._attach(actions), torch.set_grad_enabled(bool(grad_names)):
        output = model.module(input_ids=batch.tokens, attention_mask=batch.attention_mask, **kwargs)
    return Trace(output, batch, recorder, model.tokenizer, model.name, model.hook_names)


def logits_reader(metric, last: torch.Tensor, trimmed: bool = False):
    """What `metric` reads from a run's logits: `(logits, prompt of each row) -> logits read`, each row's last real
    position (`last` per prompt), the only position computed when `trimmed`, or every position."""
    if trimmed:
        return lambda logits, prompts: logits[:, -1]
    if metric.positions != "last":
        return lambda logits, prompts: logits
    return lambda logits, prompts: logits[torch.arange(len(logits), device=logits.device), last[prompts]]
