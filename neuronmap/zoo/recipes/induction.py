"""induction-2l: a 2-layer GPT-2 trained until a previous-token head (layer 0) and induction heads (layer 1) form.

The data is made on the fly from a seed: "other text" sampled from a fixed bigram (Markov) language over a
vocabulary of pronounceable pseudo-words, with random segments of varied length repeated at varied offsets and
gaps. Varying both matters: with repeats of one fixed length, a layer-0 head attending a fixed distance back
scores like an induction head without being one. A segment's second copy can only be predicted by looking up
what followed its first copy, which takes a previous-token head feeding the keys of a layer-1 head
(K-composition); `measure` checks each part of that story on fresh data, including that ablating the
previous-token head breaks it.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from . import deterministic

NAME = "induction-2l"
COMMAND = f"python -m neuronmap.zoo.train {NAME}"
TASK = "Next pseudo-word prediction on bigram-language text with repeated random segments, which a previous-token head and layer-1 induction heads learn to copy."

SPECIALS = ["<pad>", "<unk>", "<s>"]
PAD, UNK, BOS = 0, 1, 2
VOCAB_SIZE = 512
CONTEXT = 64

PREVIOUS_TOKEN_THRESHOLD = 0.5
"""A head whose mean attention from each token to the one before it is above this is a previous-token head."""
INDUCTION_THRESHOLD = 0.5
"""A head whose mean attention from a repeated token to what followed its first copy is above this is an induction head."""

_LANGUAGE_SEED = 20240611  # the bigram language and the vocabulary are part of the recipe, not of the run's seed
_SEGMENT_LENGTHS = (3, 24)  # training repeats: length range, inclusive
_GAP_LENGTHS = (0, 16)  # text between a segment and its copy
_RUN_LENGTHS = (0, 16)  # text between one repeated pair and the next


@deterministic
def train(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Train the model, save it and its tokenizer into `out_dir`, measure it, write `card.json`; return the card.

    Deterministic for a given `seed` (one CPU thread). `quick=True` is a shortened run that still shows the
    mechanism forming.
    """
    import transformers
    from tqdm.auto import tqdm

    import neuronmap

    out_dir = Path(out_dir)
    steps = _QUICK_STEPS if quick else _STEPS
    start = time.perf_counter()
    data = torch.Generator().manual_seed(seed)
    model = transformers.GPT2LMHeadModel(_config())
    _sinusoidal_positions(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.98), weight_decay=_WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    language = _language()
    bar = tqdm(range(steps), desc=f"training {NAME}", unit="step")
    for step in bar:
        tokens = _training_batch(language, _BATCH, data)
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    wall_time = time.perf_counter() - start
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = measure(neuronmap.load(model, tokenizer, name=NAME))
    card = {
        "name": NAME,
        "architecture": "GPT2LMHeadModel",
        "task": TASK,
        "recipe": {
            "command": COMMAND + (" --quick" if quick else ""),
            "seed": seed,
            "steps": steps,
            "batch": f"{_BATCH} sequences of {CONTEXT} tokens",
            "optimizer": f"AdamW lr {_LR} (warmup {_WARMUP} steps, cosine to 10%), weight decay {_WEIGHT_DECAY}",
            "data": (
                f"generated on the fly from the seed: text from a fixed random second-order Markov language over {VOCAB_SIZE - len(SPECIALS)} "
                f"pseudo-words, with uniformly random segments of {_SEGMENT_LENGTHS[0]}-{_SEGMENT_LENGTHS[1]} words repeated "
                f"after gaps of {_GAP_LENGTHS[0]}-{_GAP_LENGTHS[1]} words, pairs placed at random offsets, each sequence starting with <s>"
            ),
            "wall_time_s": round(wall_time, 1),
            "threads": 1,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "mechanisms": describe(metrics),
        "metrics": metrics,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def measure(model: Any, seed: int = 1234) -> dict:
    """The card's figures, recomputed from a loaded `neuronmap.Model` on fresh data drawn from `seed`.

    Each of 64 sequences holds a random segment (6-18 words) twice, after a text prefix (0-12 words) and a text
    gap (0-14 words). Scores are mean attention probabilities: previous-token from every token to the one before
    it; induction from each token of the second copy to the token that followed the same token in the first copy.
    Losses are mean next-token cross-entropy (nats) on the segment's first copy and on its repeat.

    Three ablations (zeroing heads' `hook_z` in layer 0) test the story: the previous-token heads together; as a
    control, the other layer-0 heads; and K-composition proper, a clean run whose layer-1 *keys* alone are taken
    from the run without the previous-token heads (queries and values stay clean).
    """
    tokens, spans = _evaluation_batch(seed)
    tokens = tokens.to(model.device)
    n_layers, n_heads = model.module.config.n_layer, model.module.config.n_head
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    clean = _scores_and_losses(model, tokens, spans, patterns, {})
    previous, induction = clean["previous_token"], clean["induction"]
    previous_heads = _heads_above(previous, PREVIOUS_TOKEN_THRESHOLD, layers=[0])
    induction_heads = _heads_above(induction, INDUCTION_THRESHOLD, layers=range(1, n_layers))
    ablated_heads = sorted(d["head"] for d in previous_heads) or [max(range(n_heads), key=lambda h: previous[0][h])]
    control_heads = [head for head in range(n_heads) if head not in ablated_heads]
    measured = [(d["layer"], d["head"]) for d in induction_heads] or [
        max(((l, h) for l in range(1, n_layers) for h in range(n_heads)), key=lambda lh: induction[lh[0]][lh[1]])
    ]

    def zero(heads: list[int]):
        def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z[:, :, heads] = 0.0
            return z

        return {"blocks.0.attn.hook_z": ablate}

    keys = [f"blocks.{layer}.attn.hook_k" for layer in range(1, n_layers)]
    ablated_keys = model.run(tokens, capture=keys, interventions=zero(ablated_heads))
    patched_keys = {name: ablated_keys[name] for name in keys}
    runs = {
        "without_previous_token_heads": _scores_and_losses(model, tokens, spans, patterns, zero(ablated_heads)),
        "keys_without_previous_token_heads": _scores_and_losses(model, tokens, spans, patterns, patched_keys),
    }
    if control_heads:
        runs["without_other_layer0_heads"] = _scores_and_losses(model, tokens, spans, patterns, zero(control_heads))
    mean_of = lambda scores: sum(scores[l][h] for l, h in measured) / len(measured)  # noqa: E731
    return {
        "previous_token_heads": previous_heads,
        "induction_heads": induction_heads,
        "scores": {"previous_token": _rounded(previous), "induction": _rounded(induction)},
        "loss_first_half": round(clean["loss_first"], 4),
        "loss_repeated_half": round(clean["loss_repeated"], 4),
        "ablation": {
            "previous_token_heads": [[0, head] for head in ablated_heads],
            "control_heads": [[0, head] for head in control_heads],
            "induction_heads": [list(lh) for lh in measured],
            "induction_score_before": round(mean_of(induction), 4),
            **{
                kind: {
                    "induction_score": round(mean_of(run["induction"]), 4),
                    "loss_repeated_half": round(run["loss_repeated"], 4),
                }
                for kind, run in runs.items()
            },
        },
        "data": {"seed": seed, "sequences": int(tokens.shape[0]), "length": int(tokens.shape[1])},
    }


def describe(metrics: dict) -> list[str]:
    """The card's human-readable mechanism lines, written from `measure`'s figures."""
    lines = [f"previous-token head {d['layer']}.{d['head']} (score {d['score']:.2f})" for d in metrics["previous_token_heads"]]
    lines += [f"induction head {d['layer']}.{d['head']} (score {d['score']:.2f})" for d in metrics["induction_heads"]]
    lines.append(
        f"repeated segments: loss {metrics['loss_repeated_half']:.2f} nats on the repeat vs "
        f"{metrics['loss_first_half']:.2f} on the first occurrence"
    )
    ablation = metrics["ablation"]
    heads = lambda pairs: " and ".join(f"{l}.{h}" for l, h in pairs)  # noqa: E731
    effect = lambda kind: (  # noqa: E731
        f"induction {ablation[kind]['induction_score']:.2f}, repeat loss {ablation[kind]['loss_repeated_half']:.2f}"
    )
    lines.append(
        f"induction ({', '.join(f'{l}.{h}' for l, h in ablation['induction_heads'])}) before ablation: {ablation['induction_score_before']:.2f}; "
        f"ablating previous-token heads {heads(ablation['previous_token_heads'])}: "
        f"{effect('without_previous_token_heads')}"
        + (
            f"; ablating the other layer-0 heads {heads(ablation['control_heads'])} instead: "
            f"{effect('without_other_layer0_heads')}"
            if ablation["control_heads"]
            else ""
        )
    )
    lines.append(
        "K-composition: with only layer 1's keys taken from the run without the previous-token heads: "
        f"{effect('keys_without_previous_token_heads')}"
    )
    return lines


def build_tokenizer():
    """The word-level tokenizer over the pseudo-word vocabulary; prepends `<s>` like the training data."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<s>",
        model_max_length=CONTEXT,
    )


def vocabulary() -> list[str]:
    """The special tokens, then 509 two-syllable pseudo-words (consonant-vowel pairs), the same every time."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    words = sorted(a + b for a, b in itertools.product(syllables, repeat=2))
    chosen = random.Random(_LANGUAGE_SEED).sample(words, VOCAB_SIZE - len(SPECIALS))
    return SPECIALS + sorted(chosen)


# ---------------------------------------------------------------------------------------------------------------
# Training settings and data.

_STEPS = 4000
_QUICK_STEPS = 2200  # the phase change comes at about 2,000 steps of the shortened schedule
_BATCH = 32
_LR = 3e-3
_WARMUP = 50
_WEIGHT_DECAY = 0.01
_POSITION_SCALE = 0.1
_INIT_RANGE = 0.05
_ZIPF = 3.0


def _config():
    import transformers

    return transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4, n_inner=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD,
        tie_word_embeddings=True, initializer_range=_INIT_RANGE,
    )


def _sinusoidal_positions(model) -> None:
    """Start the learned position embeddings from sinusoids (then trained as usual).

    From random positions, "attend to the previous token" must be learned separately for every position, which
    drags out the plateau; from sinusoids it is one rotation for all of them.
    """
    positions, width = model.config.n_positions, model.config.n_embd
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * frequencies[None, :]
    table = torch.zeros(positions, width)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(table * _POSITION_SCALE)


def _lr_factor(step: int, steps: int) -> float:
    if step < _WARMUP:
        return (step + 1) / _WARMUP
    progress = (step - _WARMUP) / max(1, steps - _WARMUP)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class _Language:
    """A fixed sparse second-order Markov language over the words.

    Each word has 12 possible successors; which of them are likely depends on the word before it (the Zipf
    weights over the 12 are rotated by that word), so the text itself rewards a layer-0 head that reads the
    previous token, the ingredient induction heads build on.
    """

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(_LANGUAGE_SEED)
        n_words = VOCAB_SIZE - len(SPECIALS)
        self.successors = torch.stack([torch.randperm(n_words, generator=generator)[:12] for _ in range(n_words)])
        weights = 1.0 / torch.arange(1, 13, dtype=torch.float64) ** _ZIPF
        rotated = torch.stack([weights.roll(shift) for shift in range(12)])
        self.cumulative = (rotated / rotated.sum(1, keepdim=True)).cumsum(1).float()
        self.cumulative[:, -1] = 1.0

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """`[batch, length]` word ids (offset past the specials) of text from random first words."""
        n_words = self.successors.shape[0]
        before = torch.randint(0, n_words, (batch,), generator=generator)
        current = torch.randint(0, n_words, (batch,), generator=generator)
        uniforms = torch.rand(batch, length, generator=generator)
        out = torch.empty(batch, length, dtype=torch.long)
        for position in range(length):
            out[:, position] = current
            rows = self.cumulative[before % 12]
            slot = torch.searchsorted(rows, uniforms[:, position : position + 1].contiguous()).squeeze(1).clamp_(max=11)
            before, current = current, self.successors[current, slot]
        return out + len(SPECIALS)


_language_cache: list[_Language] = []


def _language() -> _Language:
    if not _language_cache:
        _language_cache.append(_Language())
    return _language_cache[0]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """A uniform integer in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _random_words(length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(len(SPECIALS), VOCAB_SIZE, (length,), generator=generator)


def _training_batch(language: _Language, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Bigram text with repeated random segments: pairs (segment, gap, same segment) at varied offsets."""
    tokens = language.sample(batch, CONTEXT, generator)
    tokens[:, 0] = BOS
    for row in range(batch):
        cursor = 1 + _randint(*_RUN_LENGTHS, generator)
        while True:
            length = _randint(*_SEGMENT_LENGTHS, generator)
            gap = _randint(*_GAP_LENGTHS, generator)
            if cursor + 2 * length + gap > CONTEXT:
                break
            segment = _random_words(length, generator)
            tokens[row, cursor : cursor + length] = segment
            tokens[row, cursor + length + gap : cursor + 2 * length + gap] = segment
            cursor += 2 * length + gap + _randint(*_RUN_LENGTHS, generator)
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# Measurement.

_EVAL_SEQUENCES = 64
_EVAL_PREFIX = (0, 12)
_EVAL_SEGMENT = (6, 18)
_EVAL_GAP = (0, 14)


def _evaluation_batch(seed: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Sequences `<s> text segment text segment text`, and each one's (first start, second start, length)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = _language().sample(_EVAL_SEQUENCES, CONTEXT, generator)
    tokens[:, 0] = BOS
    spans = []
    for row in range(_EVAL_SEQUENCES):
        first = 1 + _randint(*_EVAL_PREFIX, generator)
        length = _randint(*_EVAL_SEGMENT, generator)
        second = first + length + _randint(*_EVAL_GAP, generator)
        segment = _random_words(length, generator)
        tokens[row, first : first + length] = segment
        tokens[row, second : second + length] = segment
        spans.append((first, second, length))
    return tokens, spans


def _scores_and_losses(model: Any, tokens: torch.Tensor, spans: list, patterns: list[str], interventions: dict) -> dict:
    trace = model.run(tokens, capture=patterns, interventions=interventions)
    log_probs = torch.log_softmax(trace.logits.float(), dim=-1)
    losses = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # losses[b, i]: predicting token i+1
    rows, queries, keys, first_positions, second_positions = [], [], [], [], []
    for row, (first, second, length) in enumerate(spans):
        offsets = torch.arange(length - 1)
        rows.append(torch.full((length - 1,), row))
        queries.append(second + offsets)  # a token of the repeat ...
        keys.append(first + offsets + 1)  # ... attends to what followed it the first time
        first_positions.append(first + offsets)  # predicting the segment's 2nd..last word, first time
        second_positions.append(second + offsets)  # the same predictions in the repeat
    rows, queries, keys = torch.cat(rows), torch.cat(queries), torch.cat(keys)
    first_positions, second_positions = torch.cat(first_positions), torch.cat(second_positions)
    previous_token, induction = [], []
    for name in patterns:
        pattern = trace[name].float()  # [batch, head, query, key]
        diagonal = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, head, query-1]: query i+1 -> key i
        previous_token.append(diagonal.mean(dim=(0, 2)).tolist())
        induction.append(pattern[rows, :, queries, keys].mean(dim=0).tolist())
    return {
        "previous_token": previous_token,
        "induction": induction,
        "loss_first": losses[rows, first_positions].mean().item(),
        "loss_repeated": losses[rows, second_positions].mean().item(),
    }


def _heads_above(scores: list[list[float]], threshold: float, layers) -> list[dict]:
    heads = [
        {"layer": layer, "head": head, "score": round(scores[layer][head], 4)}
        for layer in layers
        for head in range(len(scores[layer]))
        if scores[layer][head] > threshold
    ]
    return sorted(heads, key=lambda d: -d["score"])


def _rounded(scores: list[list[float]]) -> list[list[float]]:
    return [[round(value, 4) for value in row] for row in scores]
