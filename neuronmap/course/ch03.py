"""Checkers for tutorial 03, "Patching".

Each builds the clean and corrupted prompts itself from the tutorial's prompt records (the corrupted prompt names
the indirect object where the clean one repeats the subject) and recomputes the answer with plain PyTorch hooks on
the Hugging Face GPT-2 modules: a forward hook on a block for its output, a pre-hook on an attention layer's output
projection for its heads' `z`, a forward hook on an MLP. Nothing goes through NeuronMap's hook points, `nm.patch` or
`nm.patching.path_patch`, which is what the tutorial teaches, so a bug in either path shows up as a disagreement.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .feedback import failed, is_placeholder, module_of, not_started, passed

__all__ = ["DIRECT_SHARE", "check_direct_heads", "check_mean_logit_diff", "check_patched_logit_diff"]

DIRECT_SHARE = 0.1
"""Exercise 3 asks for every head whose direct path to the logits carries at least this share of the effect."""

_TOLERANCE = 1e-3  # logit differences are about 10: NeuronMap's runs and HF's agree far closer than this


def check_mean_logit_diff(answer: Callable[[Any], Any], model: Any, prompts: Sequence[dict], *, reveal: bool = False) -> bool:
    """Check `answer(trace)`: the mean over prompts of logit(IO) - logit(S) at the last position of `trace`.

    `prompts` are the tutorial's records (`"prompt"`, `"io"`, `"s"`); the answer is called on `model.run` of the
    clean prompts and of the corrupted ones, and compared with the logits of a plain HF forward of each.
    """
    pairs = _Pairs(model, prompts)

    def solution() -> str:
        return (
            "last = trace.logits[:, -1] (every prompt has the same length, so -1 is each one's final token); "
            "rows = torch.arange(len(last)); return (last[rows, io_ids] - last[rows, s_ids]).mean().item()"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function mean_logit_diff(trace); got a {type(answer).__name__}", solution, reveal)
    clean_logits, corrupt_logits = pairs.logits(pairs.clean), pairs.logits(pairs.corrupt)
    expected = {"clean": pairs.mean_diff(clean_logits), "corrupted": pairs.mean_diff(corrupt_logits)}
    got = {}
    for which, texts in (("clean", pairs.clean_texts), ("corrupted", pairs.corrupt_texts)):
        value = answer(model.run(texts))
        if is_placeholder(value):
            return not_started(solution, reveal)
        per_prompt = pairs.diffs(clean_logits if which == "clean" else corrupt_logits)
        if isinstance(value, torch.Tensor) and value.numel() > 1:
            value = value.detach().float().flatten().cpu()
            if value.shape == per_prompt.shape and torch.allclose(value, per_prompt, atol=_TOLERANCE):
                return failed("these are the right logit differences, one per prompt: return their mean, one number", solution, reveal)
            return failed(f"mean_logit_diff should return one number; got a tensor of shape {list(value.shape)}", solution, reveal)
        value = _number(value)
        if value is None:
            return failed("mean_logit_diff should return one number (a float or a one-element tensor)", solution, reveal)
        got[which] = value
    if all(math.isclose(got[w], expected[w], abs_tol=_TOLERANCE) for w in expected):
        return passed(
            "mean_logit_diff agrees with an independent forward pass on both the clean and the corrupted prompts: "
            "the model prefers the indirect object on the clean ones and the other name on the corrupted ones"
        )
    return failed(_logit_diff_hint(got, expected, pairs, clean_logits, corrupt_logits), solution, reveal)


def check_patched_logit_diff(
    answer: Callable[[int, int], Any],
    model: Any,
    prompts: Sequence[dict],
    cases: Iterable[tuple[int, int]] | None = None,
    *,
    reveal: bool = False,
) -> bool:
    """Check `answer(layer, position)`: the corrupted prompts' mean logit difference with one residual vector
    patched, `blocks.{layer}.hook_resid_post` at `position` from the clean run (denoising).

    `cases` are the (layer, position) pairs tried; by default the second subject mention (the one position where
    the prompts differ) at the first and the last layer, and the final position at the last layer.
    """
    pairs = _Pairs(model, prompts)
    blocks = pairs.blocks
    last_layer = len(blocks) - 1
    cases = list(cases) if cases is not None else [(0, pairs.s2), (last_layer, pairs.s2), (last_layer, pairs.end)]

    def solution() -> str:
        return (
            "run `corrupt` with interventions={f\"blocks.{layer}.hook_resid_post\": patch}, where patch(activation, hook) "
            "sets activation[:, position] to the clean run's activation there (clean_trace[name][:, position]) and "
            "returns it, and return mean_logit_diff of that run"
        )

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(
            f"the answer should be the function patched_logit_diff(layer, position); got a {type(answer).__name__}", solution, reveal
        )
    clean_outputs = pairs.block_outputs(pairs.clean)
    corrupt_outputs = pairs.block_outputs(pairs.corrupt)
    clean_value, corrupt_value = pairs.mean_diff(pairs.logits(pairs.clean)), pairs.mean_diff(pairs.logits(pairs.corrupt))
    readings: dict[str, list[float]] = {name: [] for name in ("expected", "noised", "block input")}
    got: list[float] = []
    for layer, position in cases:
        with _replace_output(blocks[layer], position, clean_outputs[layer]):
            readings["expected"].append(pairs.mean_diff(pairs.logits(pairs.corrupt)))
        with _replace_output(blocks[layer], position, corrupt_outputs[layer]):
            readings["noised"].append(pairs.mean_diff(pairs.logits(pairs.clean)))
        with _replace_input(blocks[layer], position, _block_inputs(pairs, layer, clean_outputs)):
            readings["block input"].append(pairs.mean_diff(pairs.logits(pairs.corrupt)))
        value = answer(layer, position)
        if is_placeholder(value):
            return not_started(solution, reveal)
        number = _number(value)
        if number is None:
            return failed(
                f"patched_logit_diff({layer}, {position}) should return one number; got {type(value).__name__} {value!r:.60}",
                solution, reveal,
            )
        got.append(number)
    if _close(got, readings["expected"]):
        tried = ", ".join(f"({layer}, {position})" for layer, position in cases)
        return passed(f"patched_logit_diff matches an independent patch of each block's output at (layer, position) = {tried}")
    first = next(i for i, (g, e) in enumerate(zip(got, readings["expected"])) if not math.isclose(g, e, abs_tol=_TOLERANCE))
    layer, position = cases[first]
    restored = [(e - corrupt_value) / (clean_value - corrupt_value) for e in readings["expected"]]
    if _close(got, restored):
        hint = "these are the fractions of the gap restored: return the patched run's mean logit difference itself"
    elif _close(got, readings["noised"]):
        hint = (
            "that is noising: the corrupted activation patched into the clean run. Denoise instead: run the corrupted "
            "prompts and patch in the clean run's activation"
        )
    elif _close(got, readings["block input"]):
        hint = f"that patches the block's input, blocks.{layer}.hook_resid_pre: patch its output, blocks.{layer}.hook_resid_post"
    elif _close(got, [corrupt_value] * len(got)):
        hint = (
            "that is the unpatched corrupted run: the patch had no effect (is it on the right hook, at the right "
            "position, and does the function return the edited activation?)"
        )
    elif _close(got, [clean_value] * len(got)):
        hint = "that is the clean run's value everywhere: patch one position of one layer, not the whole run"
    else:
        hint = f"patch blocks.{layer}.hook_resid_post at position {position} only, from the clean run into the corrupted run"
    return failed(
        f"patched_logit_diff({layer}, {position}) returned {got[first]:.4f}, expected {readings['expected'][first]:.4f}; {hint}",
        solution, reveal,
    )


def check_direct_heads(answer: Any, model: Any, prompts: Sequence[dict], *, reveal: bool = False) -> bool:
    """Check a list of (layer, head): every head whose direct path to the logits carries at least `DIRECT_SHARE`
    of the logit difference's drop when noised (path patching, corrupted into clean).

    A head's direct effect is measured in a clean run in which every head's `z` and every MLP's output are frozen
    to their clean values, except that head's `z`, which comes from the corrupted run: only the final LayerNorm and
    the unembedding see the change. Its share is (clean - that run) / (clean - corrupted).
    """
    pairs = _Pairs(model, prompts)
    shares = _direct_shares(pairs)  # [layer, head]
    n_layers, n_heads = shares.shape
    expected = sorted((l, h) for l in range(n_layers) for h in range(n_heads) if shares[l, h] >= DIRECT_SHARE)

    def solution() -> str:
        if not expected:
            return f"[]: no head's direct path carries {DIRECT_SHARE:.0%} of the effect on these prompts"
        return f"{expected}: {_carried(expected, shares)} of the effect (1 - its value in the path-patching result)"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    chosen = _heads(answer)
    if chosen is None:
        return failed(f"the answer should be a list of (layer, head) tuples, e.g. [(0, 3)]; got {answer!r}", solution, reveal)
    outside = [(l, h) for l, h in chosen if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if outside:
        return failed(f"there is no head {_names(outside)}: the model has {n_layers} layers × {n_heads} heads", solution, reveal)
    if chosen == expected:
        others = [abs(shares[l, h].item()) for l in range(n_layers) for h in range(n_heads) if (l, h) not in expected]
        rest = f"at most {_percent(max(others))}" if max(others, default=0.0) >= 0.005 else "under 1%"
        if not expected:
            return passed(f"no head's direct path carries {DIRECT_SHARE:.0%} of the effect on these prompts (each {rest})")
        writers = f"head {_names(expected)} writes" if len(expected) == 1 else f"heads {_names(expected)} write"
        return passed(
            f"{_carried(expected, shares)} of the effect, and every other head's {rest}: {writers} the answer into the logits"
        )
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    as_effects = (  # the values read as effects: `values >= 0.1`, or every head whose value is near 1
        [(l, h) for l, h in every if 1 - shares[l, h] >= DIRECT_SHARE],
        [head for head in every if head not in expected],
    )
    extra = [head for head in chosen if head not in expected]
    missing = [head for head in expected if head not in chosen]
    if chosen in as_effects:
        hint = (
            "in a noising result 1 means the patch changed nothing (the clean run) and 0 means it did all of the "
            "corruption: a head's share of the effect is 1 - its value"
        )
    elif extra:
        hint = f"{_carried(extra, shares)}: less than {DIRECT_SHARE:.0%}"
        if any(l < n_layers - 1 for l, _ in extra):
            hint += (
                ". A head of an earlier layer can matter in the head sweep, which counts every path, and still write "
                "nothing the logits read directly: its effect goes through later layers"
            )
    else:
        hint = (
            f"{len(missing)} head{'s' if len(missing) > 1 else ''} whose direct path carries at least "
            f"{DIRECT_SHARE:.0%} of the effect {'are' if len(missing) > 1 else 'is'} missing: look at every cell of the "
            f"path-patching result"
        )
    return failed(hint, solution, reveal)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Pairs:
    """The clean and corrupted prompts of `prompts` tokenised for the HF module, with their answers' token ids."""

    model: Any
    prompts: Sequence[dict]

    def __post_init__(self) -> None:
        self.module = module_of(self.model)
        self.blocks = self.module.base_model.h
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("this checker needs the model's tokenizer: pass the model returned by neuronmap.zoo.load")
        self.clean_texts = [p["prompt"] for p in self.prompts]
        self.corrupt_texts = [_flip(p) for p in self.prompts]
        self.clean = dict(tokenizer(self.clean_texts, padding=True, return_tensors="pt"))
        self.corrupt = dict(tokenizer(self.corrupt_texts, padding=True, return_tensors="pt"))
        if not torch.equal(self.clean["attention_mask"], self.corrupt["attention_mask"]):
            raise ValueError("each corrupted prompt must have as many tokens as its clean prompt")
        self.io = torch.tensor([_one_token(tokenizer, p["io"]) for p in self.prompts])
        self.s = torch.tensor([_one_token(tokenizer, p["s"]) for p in self.prompts])
        self.last = self.clean["attention_mask"].sum(1) - 1
        differ = (self.clean["input_ids"][0] != self.corrupt["input_ids"][0]).nonzero().flatten().tolist()
        self.s2, self.end = differ[0], int(self.last[0])

    def logits(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each prompt's logits at its last real token, `[prompt, vocab]`, from a plain HF forward."""
        with torch.no_grad():
            logits = self.module(**encoded).logits
        return logits[torch.arange(len(logits)), self.last].float()

    def diffs(self, last_logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(last_logits))
        return last_logits[rows, self.io] - last_logits[rows, self.s]

    def mean_diff(self, last_logits: torch.Tensor) -> float:
        return self.diffs(last_logits).mean().item()

    def block_outputs(self, encoded: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every block's output (the residual stream after it) in one forward."""
        seen: list[torch.Tensor] = []
        handles = [block.register_forward_hook(lambda m, a, out: seen.append(_first(out).detach().clone())) for block in self.blocks]
        try:
            with torch.no_grad():
                self.module(**encoded)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def record(self, encoded: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's heads' `z` (the input of the attention output projection) and MLP output, in one forward."""
        zs: dict[int, torch.Tensor] = {}
        mlps: dict[int, torch.Tensor] = {}
        handles = []
        for layer, block in enumerate(self.blocks):
            handles.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a, l=layer: zs.__setitem__(l, a[0].detach().clone())))
            handles.append(block.mlp.register_forward_hook(lambda m, a, out, l=layer: mlps.__setitem__(l, out.detach().clone())))
        try:
            with torch.no_grad():
                self.module(**encoded)
        finally:
            for handle in handles:
                handle.remove()
        return [zs[l] for l in range(len(self.blocks))], [mlps[l] for l in range(len(self.blocks))]


def _direct_shares(pairs: _Pairs) -> torch.Tensor:
    """`[layer, head]`: each head's share of the logit difference's drop through its direct path to the logits."""
    config = pairs.module.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    clean_z, clean_mlp = pairs.record(pairs.clean)
    corrupt_z, _ = pairs.record(pairs.corrupt)
    clean_value, corrupt_value = pairs.mean_diff(pairs.logits(pairs.clean)), pairs.mean_diff(pairs.logits(pairs.corrupt))
    shares = torch.empty(len(pairs.blocks), n_heads)
    for layer in range(len(pairs.blocks)):
        for head in range(n_heads):
            sender = clean_z[layer].clone()
            features = slice(head * d_head, (head + 1) * d_head)
            sender[..., features] = corrupt_z[layer][..., features]
            frozen = [sender if l == layer else z for l, z in enumerate(clean_z)]
            with _frozen(pairs.blocks, frozen, clean_mlp):
                value = pairs.mean_diff(pairs.logits(pairs.clean))
            shares[layer, head] = (clean_value - value) / (clean_value - corrupt_value)
    return shares


@contextlib.contextmanager
def _frozen(blocks: nn.ModuleList, zs: list[torch.Tensor], mlps: list[torch.Tensor]) -> Iterator[None]:
    """Every attention output projection's input and every MLP's output replaced by the given tensors."""
    handles = []
    for layer, block in enumerate(blocks):
        handles.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a, z=zs[layer]: (z.clone(), *a[1:])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, out, mlp=mlps[layer]: mlp.clone()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replace_output(block: nn.Module, position: int, source: torch.Tensor) -> Iterator[None]:
    """`block`'s output at `position` replaced by `source`'s."""

    def hook(module, args, output):
        patched = _first(output).clone()
        patched[:, position] = source[:, position]
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _replace_input(block: nn.Module, position: int, source: torch.Tensor) -> Iterator[None]:
    """`block`'s input hidden states at `position` replaced by `source`'s (positional or keyword)."""

    def hook(module, args, kwargs):
        if args:
            hidden = args[0].clone()
            hidden[:, position] = source[:, position]
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[:, position] = source[:, position]
        return args, {**kwargs, "hidden_states": hidden}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _block_inputs(pairs: _Pairs, layer: int, outputs: list[torch.Tensor]) -> torch.Tensor:
    """The clean run's input to block `layer`: the previous block's output, or the embeddings for the first."""
    if layer > 0:
        return outputs[layer - 1]
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = pairs.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pairs.module(**pairs.clean)
    finally:
        handle.remove()
    return seen["input"]


def _logit_diff_hint(
    got: dict[str, float], expected: dict[str, float], pairs: _Pairs, clean_logits: torch.Tensor, corrupt_logits: torch.Tensor
) -> str:
    """What a wrong mean logit difference most likely did."""
    wrong = "clean" if not math.isclose(got["clean"], expected["clean"], abs_tol=_TOLERANCE) else "corrupted"
    numbers = f"on the {wrong} prompts mean_logit_diff gave {got[wrong]:.4f}, expected {expected[wrong]:.4f}"
    if math.isclose(got["clean"], got["corrupted"], abs_tol=_TOLERANCE):
        return f"{numbers}; it gives the same number for both runs: compute it from the trace it is given"
    if all(math.isclose(got[w], -expected[w], abs_tol=_TOLERANCE) for w in expected):
        return f"{numbers}; that is logit(S) - logit(IO): subtract the subject's logit from the indirect object's"
    probabilities = {
        w: pairs.mean_diff(logits.softmax(-1)) for w, logits in (("clean", clean_logits), ("corrupted", corrupt_logits))
    }
    if all(math.isclose(got[w], probabilities[w], abs_tol=_TOLERANCE) for w in expected):
        return f"{numbers}; that is a difference of probabilities: use the logits themselves"
    with torch.no_grad():
        full = pairs.module(**(pairs.clean if wrong == "clean" else pairs.corrupt)).logits.float()
    for position, where in ((pairs.end - 1, "the second-to-last"), (0, "the first")):
        if math.isclose(got[wrong], pairs.mean_diff(full[:, position]), abs_tol=_TOLERANCE):
            return f"{numbers}; that reads the logits at {where} position: the next-token prediction is at the last one"
    return f"{numbers}; read trace.logits at the last position, take logit(IO) - logit(S) for each prompt, and average"


def _flip(prompt: dict) -> str:
    """The prompt with the second mention of the subject naming the indirect object instead."""
    text, s, io = prompt["prompt"], prompt["s"], prompt["io"]
    i = text.rindex(f" {s} ")
    return f"{text[:i]} {io} {text[i + len(s) + 2 :]}"


def _one_token(tokenizer: Any, name: str) -> int:
    ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the name {name!r} is {len(ids)} tokens: the logit difference needs one-token names")
    return ids[0]


def _carried(heads: Sequence[tuple[int, int]], shares: torch.Tensor) -> str:
    """E.g. "the direct path of head 1.2 carries 82%", or "the direct paths of heads 0.1 and 0.2 carry 1% and 0%"."""
    names = _names(heads)
    percents = _and([_percent(shares[l, h].item()) for l, h in heads])
    if len(heads) == 1:
        return f"the direct path of head {names} carries {percents}"
    return f"the direct paths of heads {names} carry {percents}"


def _names(heads: Sequence[tuple[int, int]]) -> str:
    return _and([f"{l}.{h}" for l, h in heads])


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _percent(share: float) -> str:
    text = f"{share:.0%}"
    return "0%" if text == "-0%" else text


def _heads(answer: Any) -> list[tuple[int, int]] | None:
    """`answer` as a sorted list of distinct (layer, head); one (layer, head) pair counts as a list of one."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(answer, tuple) and len(answer) == 2 and all(map(is_int, answer)):
        answer = [answer]
    try:
        heads = [tuple(head) for head in answer]
    except TypeError:
        return None
    if not all(len(head) == 2 and all(map(is_int, head)) for head in heads):
        return None
    return sorted(set(heads))


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if hasattr(value, "item") and getattr(value, "size", 0) == 1:  # a numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(math.isclose(x, y, abs_tol=_TOLERANCE) for x, y in zip(a, b, strict=True))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output
