"""modadd: a one-layer GPT-2 that has grokked (a + b) mod p, as in Nanda et al.'s grokking work.

Inputs are three word-level tokens `"a b ="`; the model predicts c = (a + b) mod p at the `=` position. It
is trained full-batch with AdamW and strong weight decay on a fixed, seeded fraction of all p² pairs, and
generalises to the held-out pairs. Its token embeddings then concentrate on a few Fourier frequencies over
the number tokens, which `measure` reads off the weights.

The task's settings (p, train fraction, split seed) are stored in the model's config as `modadd`, so the
train/test split can be recomputed from the saved model alone.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from . import deterministic

NAME = "modadd"

EQUALS, PAD, UNK = "=", "<pad>", "<unk>"

FULL = dict(p=113, train_fraction=0.3, lr=3e-3, weight_decay=1.0, max_steps=2000, eval_every=50, concentration=0.8)
QUICK = dict(p=59, train_fraction=0.6, lr=3e-3, weight_decay=1.0, max_steps=1000, eval_every=50, concentration=0.0)
SHAPE = dict(n_embd=128, n_head=4, n_inner=512)
BETAS = (0.9, 0.98)
WARMUP_STEPS = 10
GENERALISED = 0.999
"""Training stops at an evaluation where test accuracy is at least this and the key frequencies carry `concentration` of the
embedding's Fourier norm² (weight decay keeps cleaning the embedding up well after test accuracy saturates)."""


@deterministic
def train(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Train the modadd model, save it with its tokenizer into `out_dir`, measure it and write `card.json`."""
    import transformers
    from tqdm.auto import tqdm

    settings = QUICK if quick else FULL
    p = settings["p"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    task = {"p": p, "train_fraction": settings["train_fraction"], "split_seed": seed}
    config = transformers.GPT2Config(
        vocab_size=p + 3, n_positions=3, n_layer=1, **SHAPE,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=p, eos_token_id=p, pad_token_id=p + 1,
        architectures=["GPT2LMHeadModel"], modadd=task,
    )
    hf = transformers.GPT2LMHeadModel(config)
    hf.train()

    tokens, answers = _dataset(p)
    train_idx, test_idx = split(p, task["train_fraction"], seed)
    decay = [w for n, w in hf.named_parameters() if w.dim() == 2]
    no_decay = [w for n, w in hf.named_parameters() if w.dim() != 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings["lr"], betas=BETAS,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))

    x_train, y_train = tokens[train_idx], answers[train_idx]
    x_test, y_test = tokens[test_idx], answers[test_idx]
    generalised_at, history = None, []
    bar = tqdm(range(1, settings["max_steps"] + 1), desc=f"modadd p={p}", mininterval=1.0)
    for step in bar:
        loss = torch.nn.functional.cross_entropy(_last_logits(hf, x_train), y_train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % settings["eval_every"] == 0:
            with torch.no_grad():
                test_acc = (_last_logits(hf, x_test).argmax(-1) == y_test).float().mean().item()
            _, share, _ = _key_frequencies(hf.transformer.wte.weight.detach()[:p])
            history.append({
                "step": step, "train_loss": round(loss.item(), 5), "test_accuracy": round(test_acc, 5),
                "key_frequency_fraction": round(share, 4),
            })
            bar.set_postfix(loss=f"{loss.item():.4f}", test_acc=f"{test_acc:.3f}", key_share=f"{share:.2f}")
            if generalised_at is None and test_acc >= GENERALISED:
                generalised_at = step
            if test_acc >= GENERALISED and share >= settings["concentration"]:  # not in a loss spike
                break
    bar.close()
    wall = time.perf_counter() - start

    hf.eval()
    hf.save_pretrained(out_dir)
    tokenizer(p).save_pretrained(out_dir)

    import neuronmap

    model = neuronmap.load(out_dir, name=NAME)
    metrics = measure(model)
    freqs, share = metrics["key_frequencies"], metrics["key_frequency_fraction"]
    card = {
        "name": NAME,
        "architecture": "GPT2LMHeadModel",
        "task": f"(a + b) mod {p}: input 'a b =' (three tokens), predict c at the '=' position",
        "recipe": {
            "command": f"python -m neuronmap.zoo.train {NAME}" + (" --quick" if quick else ""),
            "seed": seed,
            "quick": quick,
            "steps": step,
            "generalised_at_step": generalised_at,
            "train_fraction": task["train_fraction"],
            "train_pairs": len(train_idx),
            "test_pairs": len(test_idx),
            "optimizer": (
                f"AdamW full-batch, lr {settings['lr']}, betas {BETAS}, weight decay {settings['weight_decay']} "
                f"on 2-D weights, {WARMUP_STEPS}-step linear warm-up; stop (at most {settings['max_steps']} steps) once "
                f"test accuracy >= {GENERALISED} and the key frequencies carry >= {settings['concentration']} of "
                f"the embedding's Fourier norm², checked every {settings['eval_every']} steps"
            ),
            "shape": {"n_layer": 1, **SHAPE, "n_positions": 3, "tie_word_embeddings": False},
            "wall_time_s": round(wall, 1),
            "threads": 1,
            "history": history,
        },
        "parameters": sum(w.numel() for w in model.module.parameters()),
        "mechanisms": [
            f"generalises: test accuracy {metrics['test_accuracy']:.2%} on {len(test_idx)} held-out pairs "
            f"(train {metrics['train_accuracy']:.2%}), first reached {GENERALISED:.1%} at step {generalised_at}",
            f"embeddings concentrate on frequencies {', '.join(map(str, freqs))} ({share:.0%} of the "
            f"non-constant Fourier norm² over the {p} number tokens; a uniform spread would give "
            f"{len(freqs) / ((p - 1) // 2):.0%})",
        ],
        "metrics": metrics,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def measure(model: Any) -> dict:
    """The card's figures, recomputed from a loaded `neuronmap.Model`: accuracies and key Fourier frequencies.

    Accuracy is the argmax of the logits at the `=` position, run through `model.run` on token ids, over the
    seeded split stored in the config. Frequencies: the DFT of W_E[:p] along the token axis; `frequency_norms`
    is ‖DFT[k]‖² for k = 1..(p-1)/2 (the constant k = 0 term left out); the key frequencies are the top ones
    down to the largest drop in that sorted list, and `key_frequency_fraction` is their share of the total.
    """
    config = model.module.config
    task = config.modadd
    p = task["p"]
    tokens, answers = _dataset(p)
    train_idx, test_idx = split(p, task["train_fraction"], task["split_seed"])
    with torch.no_grad():
        predictions = model.run(tokens.to(model.device)).logits[:, -1].argmax(-1).cpu()
    correct = (predictions == answers).float()

    key, share, energy = _key_frequencies(model.module.get_input_embeddings().weight.detach().cpu()[:p])
    return {
        "p": p,
        "train_accuracy": round(correct[train_idx].mean().item(), 5),
        "test_accuracy": round(correct[test_idx].mean().item(), 5),
        "train_pairs": len(train_idx),
        "test_pairs": len(test_idx),
        "key_frequencies": key,
        "key_frequency_fraction": round(share, 4),
        "frequency_norms": {str(k + 1): round(v, 5) for k, v in enumerate(energy.tolist())},
    }


def split(p: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the p² pairs, a-major) of the train and held-out test pairs, fixed by `seed`."""
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    return order[:n_train].sort().values, order[n_train:].sort().values


def tokenizer(p: int):
    """Word-level tokenizer: "0".."p-1" are ids 0..p-1, then "=", "<pad>", "<unk>"."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(p)} | {EQUALS: p, PAD: p + 1, UNK: p + 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, pad_token=PAD)


def _key_frequencies(embedding: torch.Tensor) -> tuple[list[int], float, torch.Tensor]:
    """Key frequencies of `embedding` [p, d] over its token axis, their share of ‖DFT[k]‖², and ‖DFT[k]‖² itself.

    k runs over 1..(p-1)/2; the key ones are the strongest, cut at the largest ratio between consecutive
    values among the twelve strongest.
    """
    spectrum = torch.fft.rfft(embedding.float(), dim=0)  # [p // 2 + 1, d_model]
    energy = spectrum[1:].abs().pow(2).sum(-1)  # k = 1 .. (p - 1) / 2
    fractions = energy / energy.sum()
    order = fractions.argsort(descending=True)
    top = fractions[order[:12]]
    cut = int((top[:-1] / top[1:]).argmax()) + 1
    key = sorted(int(k) + 1 for k in order[:cut])
    return key, fractions[order[:cut]].sum().item(), energy


def _dataset(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² inputs `[a, b, =]` (a-major) and their answers (a + b) mod p."""
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=-1)
    return tokens, (a + b) % p


def _last_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    """The GPT-2's logits at the last position only, computed from its own modules.

    Same maths as `hf(tokens).logits[:, -1]`, but the attention output, MLP and head run only where the loss
    is read (one layer: positions 0 and 1 feed the last one only through their keys and values), which makes
    full-batch training about three times cheaper. `train` checks the saved model through the real forward.
    """
    base, config = hf.transformer, hf.config
    block = base.h[0]
    n_head, d_head = config.n_head, config.n_embd // config.n_head
    batch, length = tokens.shape
    resid = base.wte(tokens) + base.wpe(torch.arange(length))
    q, k, v = block.attn.c_attn(block.ln_1(resid)).split(config.n_embd, dim=-1)
    q = q[:, -1:].view(batch, 1, n_head, d_head).transpose(1, 2)
    k = k.view(batch, length, n_head, d_head).transpose(1, 2)
    v = v.view(batch, length, n_head, d_head).transpose(1, 2)
    z = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d_head), dim=-1) @ v  # the last query sees every key
    resid = resid[:, -1] + block.attn.c_proj(z.transpose(1, 2).reshape(batch, config.n_embd))
    resid = resid + block.mlp(block.ln_2(resid))
    return hf.lm_head(base.ln_f(resid))
