"""Checkers for tutorial 05, "Sparse autoencoders".

Each recomputes the answer in plain PyTorch from the SAE's weight tensors and a forward hook on the Hugging Face
GPT-2 block whose output is the SAE's hook (`blocks.L.hook_resid_post` is the output of `transformer.h[L]`), never
through `SAE.encode`, `model.run(saes=...)` or `nm.sae.evaluate`, which is what the tutorial teaches:

* TopK latents: the k largest of (x − b_dec) W_enc + b_enc per token, ReLU'd, the rest 0;
* CE loss recovered: next-token cross-entropy over the real tokens of the clean run, of a run whose block output is
  replaced by the reconstruction, and of one where it is zeroed: (zero − spliced) / (zero − clean);
* a latent's F1 against a set of words: "the latent fires" against "the token is one of the words";
* a latent's effect on the IOI logit difference when ablated: the block output minus that latent's activation times
  its decoder row (what ablating it with the error term in place does), at every position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .feedback import failed, is_placeholder, module_of, not_started, passed

__all__ = ["check_ce_loss_recovered", "check_encode", "check_important_latent", "check_word_latent"]

_F1_SLACK = 0.02  # exercise 3 accepts any latent whose F1 is this close to the best
_EFFECT_SLACK = 0.05  # exercise 4 accepts any latent whose effect is within this share of the strongest


def check_encode(answer: Callable[[torch.Tensor], Any], sae: Any, model: Any, texts: Sequence[str], *,
                 reveal: bool = False) -> bool:
    """Check `answer(x)`: a TopK SAE's latents `[tokens, d_sae]` for activations `x` `[tokens, d_in]`, on the
    activations of `texts` at the SAE's hook."""
    def solution() -> str:
        return ("pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc; values, indices = pre.topk(sae.cfg.k, dim=-1); "
                "return torch.zeros_like(pre).scatter(-1, indices, values.relu())")

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if not callable(answer):
        return failed(f"the answer should be the function encode(x); got a {type(answer).__name__}", solution, reveal)
    with torch.no_grad():
        x = torch.cat([row[mask.bool()] for row, mask in zip(*_block_outputs(model, sae, texts))])
        expected = _topk_latents(sae, x)
        got = answer(x.clone())
    if is_placeholder(got):
        return not_started(solution, reveal)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return failed(f"encode(x) should return a tensor [tokens, d_sae] = {list(expected.shape)}; got {shape}",
                      solution, reveal)
    got = got.detach().float()
    if torch.allclose(got, expected, atol=1e-4):
        return passed(f"your encoder gives the SAE's latents for all {x.shape[0]} tokens, exactly {sae.cfg.k} "
                      f"active on each")
    active = (got > 0).sum(-1)
    with torch.no_grad():
        pre_without_bias = x @ sae.W_enc + sae.b_enc
    if torch.allclose(got, _keep_topk(pre_without_bias, sae.cfg.k), atol=1e-4):
        return failed("close: this SAE subtracts b_dec from its input before encoding (cfg.apply_b_dec_to_input)",
                      solution, reveal)
    if not (active <= sae.cfg.k).all():
        return failed(f"a TopK SAE keeps at most k = {sae.cfg.k} latents per token; yours keeps up to "
                      f"{int(active.max())}", solution, reveal)
    if (got < 0).any():
        return failed("latents are never negative: the kept values go through a ReLU", solution, reveal)
    return failed("these are not the SAE's latents: keep the k largest pre-activations of each token", solution, reveal)


def check_ce_loss_recovered(answer: Any, sae: Any, model: Any, texts: Sequence[str], *, reveal: bool = False) -> bool:
    """Check `answer`: the SAE's CE loss recovered on `texts` (one padded batch), from three runs in plain PyTorch."""
    tokens, mask = _tokens(model, texts)
    losses = {}
    with torch.no_grad():
        for name, replace in (("clean", None), ("spliced", lambda x: _reconstruction(sae, x)),
                              ("zero", torch.zeros_like)):
            with _replaced_block_output(model, sae, replace):
                logits = module_of(model)(input_ids=tokens, attention_mask=mask, use_cache=False).logits
            losses[name] = _next_token_loss(logits, tokens, mask)
    expected = (losses["zero"] - losses["spliced"]) / (losses["zero"] - losses["clean"])

    def solution() -> str:
        return (f"the mean next-token losses are {losses['clean']:.4f} (clean), {losses['spliced']:.4f} (SAE "
                f"spliced in), {losses['zero']:.4f} (zero-ablated): ({losses['zero']:.4f} - {losses['spliced']:.4f}) / "
                f"({losses['zero']:.4f} - {losses['clean']:.4f}) = {expected:.4f}")

    if is_placeholder(answer):
        return not_started(solution, reveal)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return failed(f"the answer should be one number; got a {type(answer).__name__}", solution, reveal)
    if abs(value - expected) <= 1e-3:
        return passed(f"CE loss recovered {expected:.4f}, from the mean next-token losses of the clean run, the run "
                      f"with the SAE spliced in and the run with the activation zeroed")
    inverted = (losses["spliced"] - losses["clean"]) / (losses["zero"] - losses["clean"])
    if abs(value - inverted) <= 1e-3:
        return failed("that is the share of the loss the SAE does not recover: 1 minus the answer", solution, reveal)
    if value > 1 + 1e-3 or value < 0:
        return failed("CE loss recovered lies between 0 (as bad as zeroing) and 1 (as good as the clean run) here",
                      solution, reveal)
    return failed("compare the three runs' mean next-token losses over the real tokens (padding excluded)",
                  solution, reveal)


def check_word_latent(answer: Any, sae: Any, model: Any, texts: Sequence[str], words: Sequence[str], *,
                      reveal: bool = False) -> bool:
    """Check `answer`: a latent whose firing has (nearly) the best F1 against the tokens that are one of `words`."""
    f1 = _f1_against_words(sae, model, texts, words)
    best = int(f1.argmax())

    def solution() -> str:
        return f"latent {best} (F1 {f1[best]:.3f})"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(f1):
        return failed(f"the answer should be a latent index, an int from 0 to {len(f1) - 1}; got {answer!r:.40}",
                      solution, reveal)
    if f1[answer] >= f1[best] - _F1_SLACK:
        return passed(f"latent {answer} fires on those words with F1 {f1[answer]:.3f} (the best latent's: "
                      f"{f1[best]:.3f})")
    return failed(f"latent {answer} has F1 {f1[answer]:.3f} against those words; another has much more: compare "
                  f"how often each latent fires on them and elsewhere", solution, reveal)


def check_important_latent(answer: Any, sae: Any, model: Any, prompts: Sequence[dict], *, reveal: bool = False) -> bool:
    """Check `answer`: a latent whose ablation lowers the mean IOI logit difference (nearly) the most."""
    effects = _ablation_effects(sae, model, prompts)
    best = min(effects, key=effects.get)

    def solution() -> str:
        return f"latent {best}: ablating it changes the logit difference by {effects[best]:+.3f}"

    if is_placeholder(answer):
        return not_started(solution, reveal)
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < sae.cfg.d_sae:
        return failed(f"the answer should be a latent index, an int from 0 to {sae.cfg.d_sae - 1}; got {answer!r:.40}",
                      solution, reveal)
    if answer not in effects:
        return failed(f"latent {answer} never fires on these prompts, so ablating it changes nothing", solution, reveal)
    if effects[answer] <= effects[best] * (1 - _EFFECT_SLACK):
        return passed(f"ablating latent {answer} changes the logit difference by {effects[answer]:+.3f}, the most of "
                      f"the {len(effects)} latents that fire on these prompts")
    if effects[answer] > 0:
        return failed(f"ablating latent {answer} raises the logit difference ({effects[answer]:+.3f}): look for the "
                      f"most negative change", solution, reveal)
    return failed(f"ablating latent {answer} changes the logit difference by {effects[answer]:+.3f}; another latent "
                  f"lowers it more", solution, reveal)


# --- plain-PyTorch references ------------------------------------------------------------------------------------


def _tokens(model: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = model.tokenizer(list(texts), return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _block(model: Any, sae: Any) -> torch.nn.Module:
    hook = sae.cfg.hook_name
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post":
        raise ValueError(f"these checkers read blocks.L.hook_resid_post, not {hook!r}")
    return module_of(model).transformer.h[int(parts[1])]


@contextlib.contextmanager
def _replaced_block_output(model: Any, sae: Any, replace: Callable[[torch.Tensor], torch.Tensor] | None,
                           seen: list | None = None) -> Iterator[None]:
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if seen is not None:
            seen.append(hidden.detach().clone())
        if replace is None:
            return None
        new = replace(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = _block(model, sae).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _block_outputs(model: Any, sae: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask = _tokens(model, texts)
    seen: list[torch.Tensor] = []
    with _replaced_block_output(model, sae, None, seen):
        module_of(model)(input_ids=tokens, attention_mask=mask, use_cache=False)
    return seen[0], mask


def _keep_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _topk_latents(sae: Any, x: torch.Tensor) -> torch.Tensor:
    return _keep_topk((x - sae.b_dec) @ sae.W_enc + sae.b_enc, sae.cfg.k)


def _reconstruction(sae: Any, x: torch.Tensor) -> torch.Tensor:
    return _topk_latents(sae, x) @ sae.W_dec + sae.b_dec


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    counted = (mask[:, 1:] * mask[:, :-1]).bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tokens[:, 1:].flatten(),
                                               reduction="none").view(counted.shape)
    return float(losses[counted].mean())


def _f1_against_words(sae: Any, model: Any, texts: Sequence[str], words: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        hidden, mask = _block_outputs(model, sae, texts)
        tokens, _ = _tokens(model, texts)
        real = mask.bool()
        fired = (_topk_latents(sae, hidden[real]) > 0).double()
    wanted = torch.tensor(model.tokenizer.convert_tokens_to_ids(list(words)))
    truth = torch.isin(tokens[real], wanted).double()
    hits = truth @ fired
    precision, recall = hits / fired.sum(0).clamp_min(1), hits / truth.sum().clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-12)


def _ablation_effects(sae: Any, model: Any, prompts: Sequence[dict]) -> dict[int, float]:
    texts = [p["prompt"] for p in prompts]
    tokens, mask = _tokens(model, texts)
    ids = model.tokenizer.convert_tokens_to_ids
    io, s = torch.tensor([ids(p["io"]) for p in prompts]), torch.tensor([ids(p["s"]) for p in prompts])
    rows, last = torch.arange(len(prompts)), mask.sum(1) - 1

    def logit_diff(logits: torch.Tensor) -> float:
        final = logits[rows, last]
        return float((final[rows, io] - final[rows, s]).mean())

    with torch.no_grad():
        forward = lambda: module_of(model)(input_ids=tokens, attention_mask=mask, use_cache=False).logits  # noqa: E731
        clean = logit_diff(forward())
        hidden, _ = _block_outputs(model, sae, texts)
        latents = _topk_latents(sae, hidden)
        live = (latents[mask.bool()] > 0).any(0).nonzero().flatten().tolist()
        effects = {}
        for latent in live:
            removed = latents[..., latent, None] * sae.W_dec[latent]
            with _replaced_block_output(model, sae, lambda x, removed=removed: x - removed):
                effects[latent] = logit_diff(forward()) - clean
    return effects
