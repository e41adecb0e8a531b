"""Recipe of the zoo's `ioi-resid0` SAE: a TopK sparse autoencoder on the `ioi` model's `blocks.0.hook_resid_post`
(the residual stream between its two layers), trained on the model's own training distribution.

`measure(model, sae)` finds, for each of a few token roles that the text alone defines (a name right after "and",
the "to" where the indirect object comes next, ...), the latent whose firing best predicts the role (F1 of "the
latent is active" against "the token has the role", over fresh sentences), and the card states the roles that one
latent predicts with F1 >= `STATED_F1`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import deterministic, ioi

if TYPE_CHECKING:
    import neuronmap
    from neuronmap.sae import SAE

NAME = "ioi-resid0"
MODEL = "ioi"
HOOK = "blocks.0.hook_resid_post"
SETTINGS = dict(architecture="topk", d_sae=512, k=8, batch_size=1024, lr=1e-3)
FULL = dict(texts=60_000, tokens=1_000_000)
QUICK = dict(texts=12_000, tokens=200_000)
SEED_MEASURE = 4321
MEASURE_TEXTS = 2000
STATED_F1 = 0.8
ROLES = {
    "name after and": "a name right after 'and': the second name of a pair ('Mary and *John*')",
    "name before and": "a name right before 'and': the first name of a pair ('*Mary* and John')",
    "to before a name": "'to' right before a name: where an IOI sentence's indirect object is predicted",
    "name after to": "a name right after 'to': the indirect object, the answer",
    "object": "an object word (drink, book, ball, ...)",
    "place": "a place word (store, park, school, ...)",
}


def texts(n: int, seed: int) -> list[str]:
    """`n` sentences of the `ioi` model's training distribution, sampled with `seed`."""
    rng = random.Random(seed)
    return [ioi.training_sentence(rng) for _ in range(n)]


@deterministic
def train(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Train the SAE, save it in SAELens's format into `out_dir`, measure it, write `card.json`; return the card."""
    import neuronmap as nm

    budget = QUICK if quick else FULL
    model = nm.zoo.load(MODEL)
    start = time.perf_counter()
    sae = nm.sae.train(model, HOOK, texts(budget["texts"], seed), tokens=budget["tokens"], seed=seed, progress=False,
                       **SETTINGS)
    wall = time.perf_counter() - start
    sae.save(out_dir)
    card = {
        "name": NAME,
        "architecture": f"TopK SAE {sae.cfg.d_in} → {sae.cfg.d_sae}, k={sae.cfg.k}",
        "model": MODEL,
        "hook": HOOK,
        "parameters": sum(p.numel() for p in sae.parameters()),
        "task": f"sparse features of the {MODEL!r} model's residual stream after layer 0 ({HOOK})",
        "recipe": {
            "command": f"python -m neuronmap.zoo.train {NAME}",
            "seed": seed,
            "quick": quick,
            "data": f"{budget['texts']:,} sentences of the ioi model's training distribution (ioi.training_sentence), "
                    f"windows of up to 48 tokens, a shuffled activation buffer",
            "tokens": budget["tokens"],
            **SETTINGS,
            "wall_time_s": round(wall, 1),
            "threads": 1,
        },
        **measure(model, sae),
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return card


def measure(model: neuronmap.Model, sae: SAE, seed: int = SEED_MEASURE, n: int = MEASURE_TEXTS) -> dict:
    """The card's figures: the SAE's metrics over `n` fresh sentences, and the best latent for each role."""
    from neuronmap.sae import evaluate

    sample = texts(n, seed)
    metrics = evaluate(sae, model, sample, context=ioi.ARCH["n_positions"], batch_size=64, progress=False)
    roles = role_latents(model, sae, sample)
    stated = {role: found for role, found in roles.items() if found["f1"] >= STATED_F1}
    return {
        "metrics": {
            "measured_on": f"{n:,} fresh sentences (seed {seed}), {metrics.tokens:,} tokens",
            **{key: round(value, 4) for key, value in metrics.to_dict().items() if key != "tokens"},
            "tokens": metrics.tokens,
        },
        "roles": roles,
        "mechanisms": [
            f"latent {found['latent']}: {ROLES[role]} (F1 {found['f1']:.2f}: precision {found['precision']:.2f}, "
            f"recall {found['recall']:.2f})"
            for role, found in stated.items()
        ],
    }


@torch.no_grad()
def role_latents(model: neuronmap.Model, sae: SAE, sample: list[str]) -> dict[str, dict]:
    """For each role in `ROLES`: the latent whose firing has the best F1 against it over `sample`, with its
    precision and recall and the runner-up's F1."""
    from neuronmap.inputs import pad_id
    from neuronmap.store.sources import token_batches

    fired, labels = [], {role: [] for role in ROLES}
    for batch in token_batches(sample, model.tokenizer, pad_id(model.tokenizer), ioi.ARCH["n_positions"], 64):
        trace = model.run(batch.tokens, attention_mask=batch.mask, capture=HOOK, stop_early=True)
        real = batch.mask.bool()
        fired.append(sae.encode(trace[HOOK])[real] > 0)
        for role, mask in token_roles(model.tokenizer, batch.tokens).items():
            labels[role].append(mask[real])
    active = torch.cat(fired).float()
    found = {}
    for role in ROLES:
        truth = torch.cat(labels[role]).float()
        hits = truth @ active
        precision = hits / active.sum(0).clamp_min(1)
        recall = hits / truth.sum().clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        best = f1.topk(2)
        latent = int(best.indices[0])
        found[role] = {
            "latent": latent, "f1": round(float(f1[latent]), 4), "precision": round(float(precision[latent]), 4),
            "recall": round(float(recall[latent]), 4), "runner_up_f1": round(float(best.values[1]), 4),
            "tokens": int(truth.sum()),
        }
    return found


def token_roles(tokenizer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks `[batch, pos]` of each role in `ROLES`, from the token ids alone."""
    def ids(words):
        return torch.tensor(tokenizer.convert_tokens_to_ids(list(words)))

    names, word = ids(ioi.NAMES), lambda w: tokenizer.convert_tokens_to_ids(w)
    none = torch.full((tokens.shape[0], 1), -1)
    before, after = torch.cat([none, tokens[:, :-1]], 1), torch.cat([tokens[:, 1:], none], 1)
    is_name = torch.isin(tokens, names)
    return {
        "name after and": is_name & (before == word("and")),
        "name before and": is_name & (after == word("and")),
        "to before a name": (tokens == word("to")) & torch.isin(after, names),
        "name after to": is_name & (before == word("to")),
        "object": torch.isin(tokens, ids(ioi.OBJECTS)),
        "place": torch.isin(tokens, ids(ioi.PLACES)),
    }
