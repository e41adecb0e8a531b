"""Metrics for patching: one number per prompt from a run's logits (logit difference, probability, loss, KL, ...).

A metric reads either each prompt's last real position (`positions="last"`: the sweep then asks the model for
those logits only) or every position (`"all"`). It is bound once to the sweep's prompts and the clean run, then
evaluated on stacked rows of many cells at once; `prompts[i]` says which prompt row `i` belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..errors import InputError

Answer = Union[int, str, Sequence[Union[int, str]], torch.Tensor]


@dataclass
class Context:
    """What a metric may read besides the logits: the sweep's tokens and mask `[prompt, pos]`, each prompt's last
    real position, the clean run's logits (`[prompt, vocab]` at the last positions, or `[prompt, pos, vocab]`), and
    the model (for its tokenizer)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    clean_logits: torch.Tensor
    model: Any


class Metric:
    """A number per prompt from logits. Subclasses set `positions` and `name` and define `bind`."""

    positions = "last"
    name = "metric"
    row_wise = True
    """Whether a prompt's value depends on that prompt's logits alone (a function of a whole run may not)."""

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function `(logits of rows, prompt index of each row) -> [rows]` for these prompts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class LogitDiff(Metric):
    """`logit[correct] - logit[wrong]` at each prompt's last position."""

    def __init__(self, correct: Answer, wrong: Answer):
        self.correct, self.wrong = correct, wrong
        self.name = "logit difference"

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        correct = answer_ids(self.correct, context, "correct")
        wrong = answer_ids(self.wrong, context, "wrong")

        def evaluate(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
            return _pick(logits, correct[prompts]) - _pick(logits, wrong[prompts])

        return evaluate


class TokenProbability(Metric):
    """The probability (or with `log`, the log-probability) of a token at each prompt's last position."""

    def __init__(self, token: Answer, log: bool):
        self.token, self.log = token, log
        self.name = "log-probability" if log else "probability"

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        token = answer_ids(self.token, context, "token")

        def evaluate(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
            value = _pick(logits.float().log_softmax(-1), token[prompts])
            return value if self.log else value.exp()

        return evaluate


class Loss(Metric):
    """Mean cross-entropy of predicting the clean prompts' next tokens, over each prompt's real tokens."""

    positions = "all"
    name = "loss"

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        targets = context.tokens[:, 1:]
        counted = (context.attention_mask[:, 1:] * context.attention_mask[:, :-1]).float()
        if (counted.sum(1) == 0).any():
            raise InputError("the loss metric needs prompts of at least two real tokens")

        def evaluate(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
            log_probs = logits[:, :-1].float().log_softmax(-1)
            losses = -log_probs.gather(-1, targets[prompts].unsqueeze(-1)).squeeze(-1)
            return (losses * counted[prompts]).sum(1) / counted[prompts].sum(1)

        return evaluate


class KLDivergence(Metric):
    """KL(clean run ‖ this run) of the next-token distributions at each prompt's last position (0 = the clean run)."""

    name = "KL divergence to the clean run"

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        clean = context.clean_logits.float().log_softmax(-1)

        def evaluate(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
            reference = clean[prompts]
            return (reference.exp() * (reference - logits.float().log_softmax(-1))).sum(-1)

        return evaluate


class CallableMetric(Metric):
    """A user's function of one run's logits `[prompt, pos, vocab]` returning one value per prompt."""

    positions = "all"
    row_wise = False

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)

    def bind(self, context: Context) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        n_prompts = context.tokens.shape[0]

        def evaluate(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
            # rows come in whole runs of the prompts in order; the function sees one run at a time
            values = [self._call(logits[start : start + n_prompts], n_prompts) for start in range(0, len(logits), n_prompts)]
            return torch.cat(values)

        return evaluate

    def _call(self, logits: torch.Tensor, n_prompts: int) -> torch.Tensor:
        value = self.function(logits)
        if not isinstance(value, torch.Tensor) or value.shape != (n_prompts,):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"the metric {self.name} must return one value per prompt, a tensor of shape [{n_prompts}], "
                f"but returned {shape}"
            )
        return value.float()


def as_metric(metric: Metric | Callable[[torch.Tensor], torch.Tensor]) -> Metric:
    """`metric` itself, or a callable on logits wrapped as a `Metric`."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return CallableMetric(metric)
    raise InputError(f"metric must be a patching metric (e.g. nm.patching.logit_diff(...)) or a function of the logits, not {type(metric).__name__}")


def answer_ids(answer: Answer, context: Context, what: str) -> torch.Tensor:
    """Answer tokens as ids `[prompt]`: one token for all prompts, or one per prompt; strings must be one token."""
    n_prompts = context.tokens.shape[0]
    values = answer.tolist() if isinstance(answer, torch.Tensor) else answer
    values = [values] * n_prompts if isinstance(values, (int, str)) else list(values)
    if len(values) != n_prompts:
        raise InputError(f"{what} answers: {len(values)} given for {n_prompts} prompts (give one, or one per prompt)")
    ids = [_token_id(value, context.model, what) for value in values]
    vocab = context.clean_logits.shape[-1]
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise InputError(f"{what} answer token {outside[0]} is outside the vocabulary (0 to {vocab - 1})")
    return torch.tensor(ids, device=context.clean_logits.device)


def _token_id(value: int | str, model: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise InputError(f"{what} answer {value!r} must be a token id or a string of one token")
    if model.tokenizer is None:
        raise InputError(f"{what} answer {value!r} is a string but the model has no tokenizer: give token ids")
    ids = model.tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise InputError(f"{what} answer {value!r} is {len(ids)} tokens ({pieces}), not one: give a single token")
    return ids[0]


def _pick(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()


def logit_diff(correct: Answer, wrong: Answer) -> Metric:
    """Logit of `correct` minus logit of `wrong` at each prompt's last token (one token for all, or one per prompt)."""
    return LogitDiff(correct, wrong)


def prob(token: Answer) -> Metric:
    """Probability of `token` at each prompt's last token."""
    return TokenProbability(token, log=False)


def logprob(token: Answer) -> Metric:
    """Log-probability of `token` at each prompt's last token."""
    return TokenProbability(token, log=True)


def loss() -> Metric:
    """Mean next-token cross-entropy over each prompt."""
    return Loss()


def kl() -> Metric:
    """KL divergence from the clean run's next-token distribution at each prompt's last token."""
    return KLDivergence()

