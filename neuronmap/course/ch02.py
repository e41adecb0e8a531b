"""Checkers for tutorial 02, "Attention heads".

Each recomputes the answer from HF's own attention probabilities (`output_attentions=True` on an eager copy of
the model), never through NeuronMap's hook points or scores, on the same tokens the tutorial scores, so every
number a checker prints agrees with the tutorial's. The scores follow the definitions in `neuronmap.SCORES`,
implemented here independently.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch

from .feedback import failed, is_placeholder, module_of, not_started, passed, zero_input_slice

__all__ = ["check_minimal_ablation", "check_previous_token_scores", "check_strongest_induction_head"]

_NEAR_TIE = 0.95  # a head scoring within 5% of the strongest counts as a strongest induction head too


def check_previous_token_scores(answer: Any, model: Any, tokens: torch.Tensor, *, reveal: bool = False) -> bool:
    """Check `[layer, head]` previous-token scores on `tokens`: mean attention from token i to i - 1 (i >= 1)."""
    attentions = _attentions(_eager(model), torch.as_tensor(tokens))  # [layer, batch, head, q, k]
    expected = _previous_token(attentions)

    def solution() -> str:
        return (
            "for each layer, the diagonal just below the main one of patterns[layer] "
            "(.diagonal(offset=-1, dim1=-2, dim2=-1)), averaged over prompts and query positions (.mean(dim=(0, 2))), "
            f"stacked over layers: {expected.numpy().round(2).tolist()}"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not isinstance(answer, torch.Tensor):
        return failed(
            f"the answer should be a tensor of shape [layers, heads] = {list(expected.shape)}; got a {type(answer).__name__}",
            solution, reveal,
        )
    answer = answer.detach().float().cpu()
    if answer.shape != expected.shape:
        if answer.shape == expected.T.shape:
            return failed(f"the answer is transposed: make it [layers, heads] = {list(expected.shape)}", solution, reveal)
        return failed(f"the answer has shape {list(answer.shape)}; expected [layers, heads] = {list(expected.shape)}", solution, reveal)
    if torch.allclose(answer, expected, atol=1e-4):
        layer, head = divmod(int(expected.argmax()), expected.shape[1])
        return passed(f"these are the previous-token scores; the strongest head is {layer}.{head} ({expected.max():.2f})")
    self_attention = attentions.diagonal(dim1=-2, dim2=-1).mean(dim=(1, 3))
    with_first = torch.cat([attentions[..., :1, 0], attentions.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1).mean(dim=(1, 3))
    if torch.allclose(answer, self_attention, atol=1e-4):
        hint = "that is each token's attention to itself (the main diagonal): the previous token is one below it"
    elif torch.allclose(answer, with_first, atol=1e-4):
        hint = "the first token has no previous token: average over queries 1..n-1 only"
    else:
        hint = f"the scores differ from attention to the previous token by up to {(answer - expected).abs().max():.3g}"
    return failed(hint, solution, reveal)


def check_strongest_induction_head(answer: Any, model: Any, tokens: torch.Tensor, *, reveal: bool = False) -> bool:
    """Check `(layer, head)`: the head with the highest induction score on `tokens` (a repeated random sequence).

    A head within 5% of the strongest is accepted too (and the near-ties are named).
    """
    eager = _eager(model)
    tokens = torch.as_tensor(tokens)
    attentions = _attentions(eager, tokens)
    scores = _induction_scores(attentions, _induction_weights(tokens))
    best = divmod(int(scores.argmax()), scores.shape[1])

    def solution() -> str:
        return f"head {best[0]}.{best[1]}, with an induction score of {scores.max():.2f}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not (
        isinstance(answer, (tuple, list)) and len(answer) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in answer)
    ):
        return failed(f"the answer should be a (layer, head) tuple of ints; got {answer!r}", solution, reveal)
    layer, head = answer
    if not (0 <= layer < scores.shape[0] and 0 <= head < scores.shape[1]):
        return failed(
            f"there is no head {layer}.{head}: the model has {scores.shape[0]} layers × {scores.shape[1]} heads", solution, reveal
        )
    strong = [f"{l}.{h}" for l, h in itertools.product(*map(range, scores.shape)) if scores[l, h] >= _NEAR_TIE * scores.max()]
    if scores[layer, head] >= _NEAR_TIE * scores.max():
        also = f" (heads within 5% of the strongest: {', '.join(strong)})" if len(strong) > 1 else ""
        # no score here: the tutorial's hand computation and nm.SCORES' definition differ in the second decimal
        return passed(f"head {layer}.{head} is the strongest induction head on these repeated random tokens{also}")
    higher = int((scores > scores[layer, head]).sum())
    hint = f"head {layer}.{head} scores {scores[layer, head]:.2f}, and {higher} head{'s' if higher > 1 else ''} score higher."
    if _previous_token(attentions)[layer, head] > 0.5:
        hint += " That head attends to the previous token: it sits one diagonal below the main one, not at the repeat."
    return failed(hint, solution, reveal)


def check_minimal_ablation(answer: Iterable[int], model: Any, tokens: torch.Tensor, *, reveal: bool = False) -> bool:
    """Check a smallest set of layer-0 heads whose zero-ablation cuts the best induction head below 1/4 of its score.

    The induction scores are measured on `tokens` (a repeated random sequence), before and after the ablation.
    """
    eager = _eager(model)
    tokens = torch.as_tensor(tokens)
    weights = _induction_weights(tokens)
    clean = _induction_scores(_attentions(eager, tokens), weights)
    target = divmod(int(clean.argmax()), clean.shape[1])
    n_heads = clean.shape[1]
    threshold = clean[target].item() / 4

    def ablated(heads: Iterable[int]) -> float:
        return float(_induction_scores(_attentions(eager, tokens, zero_heads=heads), weights)[target])

    def smallest() -> list[int] | None:
        for size in range(n_heads + 1):
            for subset in itertools.combinations(range(n_heads), size):
                if ablated(subset) < threshold:
                    return list(subset)
        return None

    def solution() -> str:
        heads = smallest()
        if heads is None:
            return f"no set of layer-0 heads brings induction head {target[0]}.{target[1]} below {threshold:.2f}"
        return f"{heads}: zeroing them cuts induction head {target[0]}.{target[1]} from {clean[target]:.2f} to {ablated(heads):.2f}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    try:
        chosen = sorted({int(head) for head in answer})
    except (TypeError, ValueError):
        return failed(f"the answer should be a list of layer-0 head indices; got {answer!r}", solution, reveal)
    if any(not 0 <= head < n_heads for head in chosen):
        return failed(f"layer 0 has heads 0..{n_heads - 1}; got {chosen}", solution, reveal)
    after = ablated(chosen)
    if after >= threshold:
        return failed(
            f"with heads {chosen} of layer 0 zeroed, induction head {target[0]}.{target[1]} still scores {after:.2f} "
            f"(clean {clean[target]:.2f}; the goal is below {threshold:.2f}): zero more heads, or other ones",
            solution, reveal,
        )
    for size in range(len(chosen)):
        if any(ablated(subset) < threshold for subset in itertools.combinations(range(n_heads), size)):
            return failed(
                f"zeroing {chosen} works ({after:.2f}), but a smaller set does too: try sets of {size} head{'s' if size != 1 else ''}",
                solution, reveal,
            )
    return passed(
        f"zeroing layer-0 heads {chosen} cuts induction head {target[0]}.{target[1]} from {clean[target]:.2f} to "
        f"{after:.2f}, and no smaller set does: they are the previous-token heads its keys read (K-composition)"
    )


def _previous_token(attentions: torch.Tensor) -> torch.Tensor:
    """Mean attention from each token to the one before it, `[layer, head]`."""
    return attentions.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def _induction_weights(tokens: torch.Tensor) -> torch.Tensor:
    """`[batch, query, key]`: 1 where key j (1 <= j < i) follows an earlier copy of query i's token, else 0.

    Built with a plain loop over positions, as `neuronmap.SCORES["induction"]` defines it.
    """
    tokens = tokens.unsqueeze(0) if tokens.dim() == 1 else tokens
    weights = torch.zeros(*tokens.shape, tokens.shape[1])
    for prompt, row in enumerate(tokens.tolist()):
        for query, token in enumerate(row):
            for key in range(1, query):
                if row[key - 1] == token:
                    weights[prompt, query, key] = 1.0
    return weights


def _induction_scores(attentions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[layer, head]`: attention summed over each query's induction keys, averaged over the queries that have any."""
    queries = weights.sum(-1) > 0  # [batch, query]
    summed = (attentions * weights[None, :, None]).sum(-1)  # [layer, batch, head, query]
    return summed.permute(0, 2, 1, 3)[:, :, queries].mean(-1)


def _eager(model: Any) -> torch.nn.Module:
    """A copy of the HF module with eager attention, the one implementation that returns `output_attentions`."""
    module = copy.deepcopy(module_of(model))
    module.set_attn_implementation("eager")
    return module


def _attentions(module: torch.nn.Module, tokens: torch.Tensor, zero_heads: Iterable[int] = ()) -> torch.Tensor:
    """HF's `output_attentions` stacked `[layer, batch, head, q, k]`, with `zero_heads` of layer 0 ablated."""
    d_head = module.config.hidden_size // module.config.num_attention_heads
    projection = module.base_model.h[0].attn.c_proj
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for head in zero_heads:
            stack.enter_context(zero_input_slice(projection, head * d_head, (head + 1) * d_head))
        output = module(input_ids=tokens.unsqueeze(0) if tokens.dim() == 1 else tokens, output_attentions=True, use_cache=False)
    return torch.stack(output.attentions)
