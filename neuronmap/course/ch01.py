"""Checkers for tutorial 01, "Capture and intervene".

Each one recomputes the answer with plain `register_forward_hook` / `register_forward_pre_hook` calls on the
real Hugging Face modules (never through NeuronMap's hook points, which is what the student is using), so a
bug in either path shows up as a disagreement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .feedback import failed, is_placeholder, module_of, not_started, passed, zero_input_slice

__all__ = ["check_most_important_head", "check_patched_similarity", "check_residual_sum"]


def check_residual_sum(answer: Any, model: Any, tokens: torch.Tensor, *, reveal: bool = False) -> bool:
    """Check a reconstruction of a GPT-2 model's last `hook_resid_post` from its captured components.

    `model` is the NeuronMap model (or the bare `GPT2LMHeadModel`) and `tokens` the `[batch, pos]` ids that
    were run. The reference is the last block's output, read with a forward hook on that block.
    """
    module = module_of(model)
    blocks = module.base_model.h
    last = f"blocks.{len(blocks) - 1}.hook_resid_post"

    def solution() -> str:
        return "hook_embed + hook_pos_embed + the sum, over every block L, of blocks.L.hook_attn_out + blocks.L.hook_mlp_out"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    tokens = torch.as_tensor(tokens)
    tokens = tokens.unsqueeze(0) if tokens.dim() == 1 else tokens
    with torch.no_grad(), _read_output(blocks[-1]) as seen:
        module(input_ids=tokens)
    expected = seen["output"]
    if not isinstance(answer, torch.Tensor):
        return failed(
            f"the answer should be a tensor shaped like {last}, {list(expected.shape)}; got a {type(answer).__name__}",
            solution, reveal,
        )
    answer = answer.detach().to(expected.dtype)
    if answer.shape != expected.shape:
        return failed(f"the answer has shape {list(answer.shape)}, but {last} has shape {list(expected.shape)}", solution, reveal)
    if torch.allclose(answer, expected, atol=1e-4, rtol=1e-4):
        return passed(
            f"embeddings + positions + every attn_out + every mlp_out reproduce {last}: "
            f"a pre-LN residual stream is a plain sum"
        )
    with torch.no_grad():
        positions = module.base_model.wpe(torch.arange(tokens.shape[1]))
        normalized = module.base_model.ln_f(expected)
    if torch.allclose(answer + positions, expected, atol=1e-4, rtol=1e-4):
        hint = "the positional embeddings (hook_pos_embed) are missing from the sum"
    elif torch.allclose(answer, normalized, atol=1e-4, rtol=1e-4):
        hint = f"that is the final LayerNorm's output (ln_final.hook_normalized), not {last}"
    else:
        hint = (
            f"the sum differs from {last} by up to {_max_error(answer, expected):.3g}: the stream starts as the "
            f"token and position embeddings, and each block adds what its attention and its MLP write (nothing else)"
        )
    return failed(hint, solution, reveal)


def check_most_important_head(answer: Any, model: Any, sentences: Sequence[str], layer: int, *, reveal: bool = False) -> bool:
    """Check which attention head of BERT-family `layer`, zero-ablated, moves the two sentences' similarity most.

    The similarity is the cosine of the mean-pooled last hidden states; "most" means the largest absolute
    change. A head is ablated by zeroing its slice of the attention output projection's input (its `z`).
    """
    module = module_of(model)
    encoded = _encode(model, sentences)
    config = module.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    projection = module.base_model.encoder.layer[layer].attention.output.dense
    base = _similarity(module, encoded)
    changes = []
    for head in range(n_heads):
        with zero_input_slice(projection, head * d_head, (head + 1) * d_head):
            changes.append(_similarity(module, encoded) - base)
    best = max(range(n_heads), key=lambda h: abs(changes[h]))

    def solution() -> str:
        return f"head {best}: ablating it changes the similarity by {changes[best]:+.3f}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < n_heads:
        return failed(f"the answer should be a head index, an int from 0 to {n_heads - 1}; got {answer!r}", solution, reveal)
    if math.isclose(abs(changes[answer]), abs(changes[best]), abs_tol=1e-6):
        return passed(
            f"ablating head {answer} of layer {layer} changes the similarity by {changes[answer]:+.3f}, "
            f"the most of the layer's {n_heads} heads"
        )
    larger = sum(abs(change) > abs(changes[answer]) + 1e-6 for change in changes)
    hint = (
        f"ablating head {answer} of layer {layer} changes the similarity by {changes[answer]:+.3f}, but "
        f"{larger} other head{'s' if larger > 1 else ''} of that layer change{'' if larger > 1 else 's'} it more."
    )
    signed = max(range(n_heads), key=lambda h: changes[h]), min(range(n_heads), key=lambda h: changes[h])
    if answer in signed:
        hint += " Compare absolute changes: a head matters whether it raises or lowers the similarity."
    return failed(hint, solution, reveal)


def check_patched_similarity(
    answer: Callable[[int, int], float],
    model: Any,
    clean: str,
    corrupted: str,
    probe: str,
    cases: Sequence[tuple[int, int]] | None = None,
    *,
    reveal: bool = False,
) -> bool:
    """Check `answer(layer, position)`: the probe similarity of `corrupted` with one residual vector patched.

    The patch copies the clean run's `blocks.{layer}.hook_resid_post` (a BERT layer's output) at `position`
    into the corrupted run; the result is the cosine between the patched run's mean-pooled embedding and the
    probe sentence's. `cases` are the (layer, position) pairs tried; by default the first and last layer at
    the first position where the two inputs differ, and a middle layer at position 0.
    """

    def solution() -> str:
        return (
            "run `corrupted` with interventions={f\"blocks.{layer}.hook_resid_post\": patch}, where patch(activation, "
            "hook) sets activation[:, position] to the clean run's activation at that position and returns it, and "
            "return the patched run's probe_similarity"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function patched_similarity(layer, position); got a {type(answer).__name__}", solution, reveal)
    module = module_of(model)
    layers = module.base_model.encoder.layer
    clean_ids, corrupted_ids = _encode(model, [clean]), _encode(model, [corrupted])
    if clean_ids["input_ids"].shape != corrupted_ids["input_ids"].shape:
        return failed("the clean and corrupted inputs must have the same number of tokens to patch position by position")
    differ = (clean_ids["input_ids"] != corrupted_ids["input_ids"])[0].nonzero().flatten().tolist()
    where = differ[0] if differ else 1
    cases = list(cases) if cases is not None else [(0, where), (len(layers) - 1, where), (len(layers) // 2, 0)]
    with torch.no_grad():
        probe_embedding = _embeddings(module, _encode(model, [probe]))[0]
        clean_outputs = {}
        for layer in {layer for layer, _ in cases}:
            with _read_output(layers[layer]) as seen:
                module(**clean_ids)
            clean_outputs[layer] = seen["output"]
        unpatched = _cosine(_embeddings(module, corrupted_ids)[0], probe_embedding)
        clean_similarity = _cosine(_embeddings(module, clean_ids)[0], probe_embedding)
    for layer, position in cases:
        with torch.no_grad(), _patch_output(layers[layer], position, clean_outputs[layer]):
            expected = _cosine(_embeddings(module, corrupted_ids)[0], probe_embedding)
        got = answer(layer, position)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if is_placeholder(got):
            return not_started(solution, reveal)
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return failed(f"patched_similarity({layer}, {position}) should return a float; got a {type(got).__name__}", solution, reveal)
        if math.isclose(got, expected, abs_tol=1e-4):
            continue
        if math.isclose(got, unpatched, abs_tol=1e-4):
            hint = (
                "that is the unpatched corrupted similarity: the patch had no effect (is it on the right hook, and "
                "does it edit the activation it is given or return the edited one?)"
            )
        elif math.isclose(got, clean_similarity, abs_tol=1e-4):
            hint = "that is the clean similarity: patch only one position, not the whole sequence"
        else:
            hint = f"patch blocks.{layer}.hook_resid_post at position {position} only, from the clean run into the corrupted run"
        return failed(f"patched_similarity({layer}, {position}) returned {got:.4f}, expected {expected:.4f}; {hint}", solution, reveal)
    tried = ", ".join(f"({layer}, {position})" for layer, position in cases)
    return passed(f"patched_similarity matches an independent patch at (layer, position) = {tried}")


# ---------------------------------------------------------------------------------------------------------------


def _encode(model: Any, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this checker needs the model's tokenizer: pass the model returned by neuronmap.load")
    return dict(tokenizer(list(sentences), padding=True, return_tensors="pt"))


def _embeddings(module: nn.Module, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = module(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _similarity(module: nn.Module, encoded: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        first, second = _embeddings(module, encoded)[:2]
    return _cosine(first, second)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _read_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda mod, args, output: seen.__setitem__("output", _first(output).detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def _patch_output(module: nn.Module, position: int, source: torch.Tensor) -> Iterator[None]:
    def hook(mod, args, output):
        patched = _first(output).clone()
        patched[:, position] = source[:, position]
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
