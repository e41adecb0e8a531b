"""Checkers for tutorial 06, "Representations".

Each recomputes the answer in plain PyTorch (and scikit-learn for the probe) on the Hugging Face GPT-2 modules, never
through `nm.analysis`, which is what the tutorial teaches:

* linear CKA from the centred Gram matrices of the samples, HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)), where the
  tutorial's own route is feature space;
* where a property becomes linearly readable: a logistic probe (standardised features, 5 stratified folds) at every
  point of the residual stream, each read as the input of the module after it (`hook_resid_pre` of block 0 is that
  block's input, `hook_resid_mid` the input of its `ln_2`, `hook_resid_post` the input of the next block or `ln_f`);
* the logit lens: `transformer.ln_f` and `lm_head` applied to the output of each block;
* a head's direct effect on a logit difference: its slice of the input of `attn.c_proj` times its rows of
  `c_proj.weight`, centred and divided by the final LayerNorm's scale in the clean run (from the input of `ln_f`),
  times `ln_f.weight`, dotted with the difference of two rows of `lm_head.weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .feedback import failed, is_placeholder, module_of, not_started, passed

__all__ = ["PROBE_HOOKS", "READABLE", "check_first_readable", "check_head_effect", "check_lens", "check_linear_cka"]

READABLE = 0.95
"""Exercise 2 asks for the first point of the residual stream where a probe's accuracy reaches this."""

PROBE_HOOKS = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
               "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")
"""The points of a 2-layer model's residual stream that exercise 2 probes, in the order the model computes them."""

_RANDOM_SHAPES = ((50, 7, 5), (12, 30, 3))  # besides the tutorial's pair, exercise 1 is tried on random (n, dx, dy)


def check_linear_cka(answer: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor, y: torch.Tensor, *,
                     reveal: bool = False) -> bool:
    """Check `answer(x, y)`: linear CKA of two activation matrices `[samples, features]`, on `x`, `y` and on random
    pairs, against the centred-Gram formula."""
    def solution() -> str:
        return ("x, y = x - x.mean(0), y - y.mean(0); return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * "
                "(y.T @ y).norm())")

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function linear_cka(x, y); got a {type(answer).__name__}",
                      solution, reveal)
    generator = torch.Generator().manual_seed(0)
    pairs = [(torch.as_tensor(x).double(), torch.as_tensor(y).double())]
    pairs += [(torch.randn(n, dx, generator=generator, dtype=torch.float64),
               torch.randn(n, dy, generator=generator, dtype=torch.float64)) for n, dx, dy in _RANDOM_SHAPES]
    for a, b in pairs:
        expected = _gram_cka(a, b)
        got = answer(a.clone(), b.clone())
        if is_placeholder(got):
            return not_started(solution, reveal)
        try:
            value = float(got)
        except (TypeError, ValueError, RuntimeError):
            return failed(f"linear_cka(x, y) should return one number; got {type(got).__name__}", solution, reveal)
        if abs(value - expected) <= 1e-6:
            continue
        if abs(value - _gram_cka(a, b, centre=False)) <= 1e-6:
            return failed("close: CKA centres each feature first (subtract the mean over samples from every column)",
                          solution, reveal)
        if abs(value - expected**0.5) <= 1e-6:
            return failed("close: CKA uses the squared Frobenius norm of yᵀx in the numerator", solution, reveal)
        if value > 1 + 1e-9 or value < -1e-9:
            return failed(f"CKA lies between 0 and 1; yours gives {value:.4g} on a {a.shape[0]} × {a.shape[1]} and a "
                          f"{b.shape[0]} × {b.shape[1]} matrix: normalise the cross term by the two self terms",
                          solution, reveal)
        return failed(f"on a {a.shape[0]} × {a.shape[1]} and a {b.shape[0]} × {b.shape[1]} matrix yours gives "
                      f"{value:.4g}, not CKA: compare ‖yᵀx‖² with ‖xᵀx‖ ‖yᵀy‖ after centring", solution, reveal)
    return passed(f"your linear CKA equals the centred-Gram formula on the tutorial's pair and {len(_RANDOM_SHAPES)} "
                  f"random ones")


def check_first_readable(answer: Any, model: Any, texts: Sequence[str], names: Sequence[str], *,
                         reveal: bool = False) -> bool:
    """Check `answer`: the first of `PROBE_HOOKS` at which a logistic probe tells, over the tokens of `texts` that are
    one of `names`, a name already seen earlier in its text from a first mention, with accuracy of at least
    `READABLE`."""
    accuracy, baseline = _probe_accuracies(model, texts, names)
    readable = [hook for hook in PROBE_HOOKS if accuracy[hook] >= READABLE]
    first = readable[0] if readable else None

    def solution() -> str:
        scores = ", ".join(f"{hook} {accuracy[hook]:.3f}" for hook in PROBE_HOOKS)
        return f"{first} (accuracies: {scores})"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if answer not in PROBE_HOOKS:
        return failed(f"the answer should be one of the hook names {', '.join(PROBE_HOOKS)}; got {answer!r:.60}",
                      solution, reveal)
    if answer == first:
        return passed(f"{answer} is the first point of the residual stream where a linear probe reads whether a name "
                      f"was seen before")
    if accuracy[answer] < READABLE:
        return failed(f"at {answer} a probe reaches only {accuracy[answer]:.3f} (always guessing the commoner class: "
                      f"{baseline:.3f}): the property is not readable there yet", solution, reveal)
    return failed(f"a probe reads it at {answer}, but already earlier: which part of the block moves information "
                  f"between positions?", solution, reveal)


def check_lens(answer: Callable[[torch.Tensor], Any], model: Any, text: str, *, reveal: bool = False) -> bool:
    """Check `answer(resid)`: the logit lens's logits (or log-probabilities) `[positions, vocab]` of a residual stream
    `[positions, d_model]`, on the output of every block for `text`, against `ln_f` and `lm_head`."""
    def solution() -> str:
        return "return model.module.transformer.ln_f(resid) @ model.weights.W_U + model.weights.b_U"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function lens(resid); got a {type(answer).__name__}", solution, reveal)
    hf = module_of(model)
    outputs = _inputs_of(hf, _block_output_readers(hf), **model.tokenizer(text, return_tensors="pt"))
    with torch.no_grad():
        for layer, resid in enumerate(outputs.values()):
            resid = resid[0]
            expected = hf.lm_head(hf.transformer.ln_f(resid)).log_softmax(-1)
            got = answer(resid.clone())
            if is_placeholder(got):
                return not_started(solution, reveal)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                return failed(f"lens(resid) should return a tensor [positions, vocab] = {list(expected.shape)}; got "
                              f"{shape}", solution, reveal)
            got = got.detach().float()
            if torch.allclose(got.log_softmax(-1), expected, atol=1e-4):
                continue
            if torch.allclose(got.log_softmax(-1), hf.lm_head(resid).log_softmax(-1), atol=1e-4):
                return failed("close: the residual stream goes through the final LayerNorm before the unembedding",
                              solution, reveal)
            if torch.allclose(got, expected.exp(), atol=1e-4):
                return failed("these are probabilities: return the logits (or log-probabilities) instead",
                              solution, reveal)
            return failed(f"at the output of block {layer} these are not the logits of the final LayerNorm and the "
                          f"unembedding", solution, reveal)
    return passed(f"your lens gives the model's own reading of the residual stream after each of the {len(outputs)} "
                  f"blocks (after the last one: the model's logits)")


def check_head_effect(answer: Any, model: Any, prompt: dict, layer: int, head: int, *, reveal: bool = False) -> bool:
    """Check `answer`: head `layer`.`head`'s direct effect on logit(`prompt["io"]`) − logit(`prompt["s"]`) at the last
    token of `prompt["prompt"]`, with the final LayerNorm's scale frozen from the clean run."""
    parts = _head_effect_parts(model, prompt, layer, head)
    expected = parts["effect"]

    def solution() -> str:
        return (f"{expected:+.4f}: z[-1, head] @ W_O[layer][head], centred, divided by the final LayerNorm's scale "
                f"({parts['scale']:.4f}), times its weight, dotted with W_U[:, IO] − W_U[:, S]")

    if is_placeholder(answer):
        return not_started(solution, reveal)
    try:
        value = float(answer)
    except (TypeError, ValueError, RuntimeError):
        return failed(f"the answer should be one number; got a {type(answer).__name__}", solution, reveal)
    if _close(value, expected):
        return passed(f"L{layer}H{head} writes {value:+.3f} to the logit difference directly")
    if _close(value, -expected):
        return failed("the sign is flipped: the difference is logit(IO) − logit(S)", solution, reveal)
    for variant, hint in (
        ("uncentred", "close: a LayerNorm subtracts the mean of the vector before dividing by the scale"),
        ("unscaled", "close: divide by the final LayerNorm's scale in the clean run, ln_final.hook_scale at the last "
                     "token"),
        ("unweighted", "close: after dividing by the scale, multiply by the final LayerNorm's weight"),
        ("with_bias", "close: the head's term leaves out the attention output bias b_O, shared by all heads and "
                      "counted separately"),
    ):
        if _close(value, parts[variant]):
            return failed(hint, solution, reveal)
    return failed("not the head's direct effect: take its z at the last token through its W_O, then the frozen final "
                  "LayerNorm, then the direction W_U[:, IO] − W_U[:, S]", solution, reveal)


# --- plain-PyTorch references ------------------------------------------------------------------------------------


def _gram_cka(x: torch.Tensor, y: torch.Tensor, *, centre: bool = True) -> float:
    """Linear CKA from `[n × n]` Gram matrices, doubly centred with H = I − 11ᵀ/n (uncentred when not `centre`)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    if centre:
        k, l = h @ k @ h, h @ l @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def _inputs_of(hf: torch.nn.Module, modules: dict[str, torch.nn.Module], **inputs: Any) -> dict[str, torch.Tensor]:
    """The first input of each of `modules` in a forward of `hf` on `inputs`, by name (hooks removed even on error)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach()))
               for name, module in modules.items()]
    try:
        with torch.no_grad():
            hf(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: seen[name] for name in modules}


def _block_output_readers(hf: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The module whose input is each block's output (the residual stream after it): the next block, or `ln_f`."""
    blocks = list(hf.transformer.h)
    return {f"blocks.{layer}.hook_resid_post": (blocks[layer + 1] if layer + 1 < len(blocks) else hf.transformer.ln_f)
            for layer in range(len(blocks))}


def _residual_points(model: Any, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every point of `PROBE_HOOKS` for `texts` as `[real tokens, d_model]`, read as the input of the module after it
    (a block, its `ln_2`, or `ln_f`), with the token ids `[batch, pos]` and which of them are real (not padding)."""
    hf = module_of(model)
    encoded = model.tokenizer(list(texts), return_tensors="pt", padding=True)
    readers = {"blocks.0.hook_resid_pre": hf.transformer.h[0], **_block_output_readers(hf)}
    readers.update({f"blocks.{layer}.hook_resid_mid": block.ln_2 for layer, block in enumerate(hf.transformer.h)})
    points = _inputs_of(hf, readers, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    real = encoded["attention_mask"].bool()
    return {name: points[name][real] for name in PROBE_HOOKS}, encoded["input_ids"], real


def _probe_accuracies(model: Any, texts: Sequence[str], names: Sequence[str]) -> tuple[dict[str, float], float]:
    """Cross-validated accuracy of a logistic probe for "this name was seen earlier in its text" at each point, over
    the name tokens; and the accuracy of always guessing the commoner class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    points, tokens, real = _residual_points(model, texts)
    name_ids = set(model.tokenizer.convert_tokens_to_ids(list(names)))
    seen_before, is_name = [], []
    for row, mask in zip(tokens.tolist(), real.tolist()):
        seen: set[int] = set()
        for token, live in zip(row, mask):
            if live:
                is_name.append(token in name_ids)
                seen_before.append(token in seen)
                seen.add(token)
    rows = np.array(is_name)
    labels = np.array(seen_before)[rows]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    accuracy = {}
    for hook in PROBE_HOOKS:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        accuracy[hook] = float(cross_val_score(probe, points[hook].double().numpy()[rows], labels, cv=folds).mean())
    return accuracy, float(max(labels.mean(), 1 - labels.mean()))


def _head_effect_parts(model: Any, prompt: dict, layer: int, head: int) -> dict[str, float]:
    """The head's direct effect, and the effects a usual mistake gives instead (no centring, no scale, no weight,
    with the output bias), in float64."""
    hf = module_of(model)
    attn = hf.transformer.h[layer].attn
    seen = _inputs_of(hf, {"z": attn.c_proj, "final": hf.transformer.ln_f},
                      **model.tokenizer(prompt["prompt"], return_tensors="pt"))
    d_head = hf.config.n_embd // hf.config.n_head
    columns = slice(head * d_head, (head + 1) * d_head)
    written = seen["z"][0, -1, columns].double() @ attn.c_proj.weight.detach()[columns].double()  # Conv1D: [in, out]
    final, ln_f = seen["final"][0, -1].double(), hf.transformer.ln_f
    scale = torch.sqrt(final.var(unbiased=False) + ln_f.eps)
    weight = ln_f.weight.detach().double()
    ids = model.tokenizer.convert_tokens_to_ids([prompt["io"], prompt["s"]])
    unembed = hf.lm_head.weight.detach().double()
    direction = unembed[ids[0]] - unembed[ids[1]]

    def effect(vector: torch.Tensor, *, centre: bool = True, divide: bool = True, scaled: bool = True) -> float:
        vector = vector - vector.mean() if centre else vector
        vector = vector / scale if divide else vector
        return float((vector * weight if scaled else vector) @ direction)

    return {
        "effect": effect(written),
        "scale": float(scale),
        "uncentred": effect(written, centre=False),
        "unscaled": effect(written, divide=False),
        "unweighted": effect(written, scaled=False),
        "with_bias": effect(written + attn.c_proj.bias.detach().double()),
    }


def _close(value: float, expected: float) -> bool:
    return abs(value - expected) <= 1e-3
