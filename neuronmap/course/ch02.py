"""Checkers for tutorial 02, "Attention heads".

Each recomputes the answer from HF's own attention probabilities (`output_attentions=True` on an eager copy of
the model), never through NeuronMap's hook points or scores, and on its own random tokens where the answer
should not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch

from .feedback import failed, module_of, passed, zero_input_slice

__all__ = ["check_minimal_ablation", "check_previous_token_scores", "check_strongest_induction_head"]

_SEED = 20260
_LENGTH = 24
_BATCH = 16


def check_previous_token_scores(answer: Any, model: Any, tokens: torch.Tensor) -> bool:
    """Check `[layer, head]` previous-token scores on `tokens`: mean attention from token i to i - 1 (i >= 1)."""
    attentions = _attentions(_eager(model), torch.as_tensor(tokens))  # [layer, batch, head, q, k]
    expected = _previous_token(attentions)
    if not isinstance(answer, torch.Tensor):
        return failed(f"the answer should be a tensor of shape [layers, heads] = {list(expected.shape)}; got a {type(answer).__name__}")
    answer = answer.detach().float().cpu()
    if answer.shape != expected.shape:
        if answer.shape == expected.T.shape:
            return failed(f"the answer is transposed: make it [layers, heads] = {list(expected.shape)}")
        return failed(f"the answer has shape {list(answer.shape)}; expected [layers, heads] = {list(expected.shape)}")
    if torch.allclose(answer, expected, atol=1e-4):
        layer, head = divmod(int(expected.argmax()), expected.shape[1])
        return passed(f"these are the previous-token scores; the strongest head is {layer}.{head} ({expected.max():.2f})")
    self_attention = attentions.diagonal(dim1=-2, dim2=-1).mean(dim=(1, 3))
    with_first = torch.cat([attentions[..., :1, 0], attentions.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1).mean(dim=(1, 3))
    if torch.allclose(answer, self_attention, atol=1e-4):
        return failed("that is each token's attention to itself (the main diagonal): the previous token is one below it")
    if torch.allclose(answer, with_first, atol=1e-4):
        return failed("the first token has no previous token: average over queries 1..n-1 only")
    return failed(f"the scores differ from attention to the previous token by up to {(answer - expected).abs().max():.3g}")


def check_strongest_induction_head(answer: Any, model: Any) -> bool:
    """Check `(layer, head)`: the head that attends most from a repeated token to the token after its first copy."""
    eager = _eager(model)
    attentions = _attentions(eager, _repeated_tokens(eager))
    scores = _induction_scores(attentions)
    best = divmod(int(scores.argmax()), scores.shape[1])
    if not (isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(x, int) for x in answer)):
        return failed(f"the answer should be a (layer, head) tuple of ints; got {answer!r}")
    layer, head = answer
    if not (0 <= layer < scores.shape[0] and 0 <= head < scores.shape[1]):
        return failed(f"there is no head {layer}.{head}: the model has {scores.shape[0]} layers × {scores.shape[1]} heads")
    strong = [f"{l}.{h}" for l, h in itertools.product(*map(range, scores.shape)) if scores[l, h] >= 0.95 * scores.max()]
    if scores[layer, head] >= 0.95 * scores.max():
        also = f" (heads within 5% of the strongest: {', '.join(strong)})" if len(strong) > 1 else ""
        return passed(f"head {layer}.{head} scores {scores[layer, head]:.2f} on fresh repeated random tokens{also}")
    hint = ""
    if _previous_token(attentions)[layer, head] > 0.5:
        hint = " That head attends to the previous token: it sits one diagonal below the main one, not at the repeat."
    return failed(
        f"head {layer}.{head} scores {scores[layer, head]:.2f}; the strongest induction head is {best[0]}.{best[1]} "
        f"({scores.max():.2f}).{hint}"
    )


def check_minimal_ablation(answer: Iterable[int], model: Any) -> bool:
    """Check a smallest set of layer-0 heads whose zero-ablation cuts the best induction head below 1/4 of its score."""
    eager = _eager(model)
    tokens = _repeated_tokens(eager)
    clean = _induction_scores(_attentions(eager, tokens))
    target = divmod(int(clean.argmax()), clean.shape[1])
    try:
        chosen = sorted({int(head) for head in answer})
    except (TypeError, ValueError):
        return failed(f"the answer should be a list of layer-0 head indices; got {answer!r}")
    n_heads = clean.shape[1]
    if any(not 0 <= head < n_heads for head in chosen):
        return failed(f"layer 0 has heads 0..{n_heads - 1}; got {chosen}")

    def ablated(heads) -> float:
        return float(_induction_scores(_attentions(eager, tokens, zero_heads=heads))[target])

    threshold = clean[target].item() / 4
    after = ablated(chosen)
    if after >= threshold:
        return failed(
            f"with heads {chosen} of layer 0 zeroed, induction head {target[0]}.{target[1]} still scores {after:.2f} "
            f"(clean {clean[target]:.2f}; the goal is below {threshold:.2f})"
        )
    for size in range(len(chosen)):
        for subset in itertools.combinations(range(n_heads), size):
            score = ablated(subset)
            if score < threshold:
                return failed(f"{list(subset)} is a smaller set that already does it ({score:.2f})")
    return passed(
        f"zeroing layer-0 heads {chosen} cuts induction head {target[0]}.{target[1]} from {clean[target]:.2f} to "
        f"{after:.2f}, and no smaller set does: they are the previous-token heads its keys read (K-composition)"
    )


def _repeated_tokens(module: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_SEED)
    segment = torch.randint(3, module.config.vocab_size, (_BATCH, _LENGTH), generator=generator)
    start = torch.full((_BATCH, 1), module.config.bos_token_id if module.config.bos_token_id is not None else 0)
    return torch.cat([start, segment, segment], dim=1)


def _previous_token(attentions: torch.Tensor) -> torch.Tensor:
    """Mean attention from each token to the one before it, `[layer, head]`."""
    return attentions.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def _induction_scores(attentions: torch.Tensor) -> torch.Tensor:
    """Mean attention from each token of the repeat to the token after its first copy, `[layer, head]`."""
    queries = torch.arange(1 + _LENGTH, attentions.shape[-1])
    return attentions[:, :, :, queries, queries - _LENGTH + 1].mean(dim=(1, 3))


def _eager(model: Any) -> torch.nn.Module:
    """A copy of the HF module with eager attention, the one implementation that returns `output_attentions`."""
    module = copy.deepcopy(module_of(model))
    module.set_attn_implementation("eager")
    return module


def _attentions(module: torch.nn.Module, tokens: torch.Tensor, zero_heads=()) -> torch.Tensor:
    """HF's `output_attentions` stacked `[layer, batch, head, q, k]`, with `zero_heads` of layer 0 ablated."""
    d_head = module.config.hidden_size // module.config.num_attention_heads
    projection = module.base_model.h[0].attn.c_proj
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for head in zero_heads:
            stack.enter_context(zero_input_slice(projection, head * d_head, (head + 1) * d_head))
        output = module(input_ids=tokens.unsqueeze(0) if tokens.dim() == 1 else tokens, output_attentions=True, use_cache=False)
    return torch.stack(output.attentions)
