"""Zoo entry `ioi`: a small GPT-2 trained on templated text in which indirect-object identification is one task.

"When Mary and John went to the store, John gave a drink to" -> "Mary". The corpus mixes IOI sentences (names in
both orders: ABBA, where the indirect object is named first, and BABA, where the subject is) with other templated
sentences about the same names, places and objects, so the model is a small language model, not an IOI classifier.

Generalisation is measured on what training never shows: a set of held-out name pairs (every name still appears in
training, in other pairs) and whole held-out templates. `measure` samples fresh held-out prompts, scores them, and
measures the mechanism this model actually uses: per head, where the final position attends (the indirect object,
either subject mention, the start token), where the second subject mention attends, the effect of zero-ablating
the head (through `blocks.L.attn.hook_z`) on the logit difference, and the head's direct contribution to it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import deterministic

if TYPE_CHECKING:
    import neuronmap

NAME = "ioi"
SEED_MEASURE = 1234

NAMES = (
    "Mary John Alice Bob Tom Anna Sarah James Emma David Laura Peter Kate Mark Lucy Paul Rose Sam Jane Mike Emily "
    "Daniel Grace Henry Julia Kevin Linda Oscar Nina Chris Helen Adam Olivia Ryan Sophie Jack Clara Ben Diana Eric "
    "Fiona George Irene Leo Maria Victor Zoe Tim"
).split()
PLACES = "store park school market beach library office garden station cafe restaurant museum".split()
OBJECTS = "drink book ball letter gift key ring bag apple flower phone basket".split()

# IOI templates: {A} and {B} are the two names in order of first mention, {S} is the subject named again; the answer
# is the other name (the indirect object). Held-out templates recombine training words into sentences never seen.
TRAIN_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "{A} and {B} went to the {place}. {S} handed the {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "The {place} was busy when {A} and {B} arrived. {S} passed the {object} to",
    "When {A} and {B} were at the {place}, {S} threw the {object} to",
    "After the meeting, {A} and {B} went to the {place}. {S} brought a {object} to",
    "{A} and {B} had lunch at the {place}. Later, {S} sent a {object} to",
    "Since {A} and {B} were at the {place}, {S} showed the {object} to",
    "Yesterday {A} and {B} visited the {place}, and {S} gave the {object} to",
    "When {A} and {B} came home, {S} gave a {object} to",
    "{A} and {B} were talking. Then {S} handed a {object} to",
    "At the {place}, {A} and {B} found a {object}. {S} passed it to",
]
HELDOUT_TEMPLATES = [
    "After {A} and {B} arrived at the {place}, {S} threw a {object} to",
    "Yesterday {A} and {B} went to the {place}. {S} handed it to",
    "While {A} and {B} were talking at the {place}, {S} sent the {object} to",
    "Then {A} and {B} visited the {place}, and {S} showed a {object} to",
    "{A} and {B} had a long argument at the {place}. Later, {S} gave a {object} to",
]
# Other templated text over the same words: one name, two names without an indirect object, "to the {place}",
# a name repeated, and counting. None of them has the IOI structure.
OTHER_TEMPLATES = [
    "{A} went to the {place} and bought a {object}.",
    "The {object} is on the table at the {place}.",
    "{A} likes the {place} because it is quiet.",
    "{A} walked to the {place} with a {object}.",
    "When {A} went to the {place}, {A} found a {object}.",
    "{A} and {B} went to the {place} together.",
    "{A} said that the {object} was in the {place}.",
    "The {place} is big, and the {object} is small.",
    "{A} and {B} were talking at the {place} about the {object}.",
    "Later, {A} gave the {object} to the {place}.",
    "{A} thanked {B} for the {object}.",
    "{count}",
]
NAMELESS_TEMPLATES = [t for t in OTHER_TEMPLATES if "{A}" not in t]
COUNT_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()
OTHER_FRACTION = 0.35  # share of training texts drawn from OTHER_TEMPLATES
PREFIX_FRACTION = 0.4  # share of training texts that start with a name-free sentence from OTHER_TEMPLATES
HELDOUT_PAIR_FRACTION = 0.15  # share of unordered name pairs never seen together in training
SPECIALS = ["<pad>", "<unk>", "<s>"]

ARCH = dict(n_layer=2, n_embd=128, n_head=4, n_positions=48)
FULL = dict(steps=3000, batch=64, lr=3e-3, warmup=200)
QUICK = dict(steps=800, batch=64, lr=3e-3, warmup=100)
IMPORTANT_FRACTION = 0.5  # a head "matters" when zero-ablating it lowers the logit difference by >= half its clean value
GATHER_ATTENTION = 0.5  # a head "gathers names" when >= half its attention from the final position is on IO, S1, S2


@deterministic
def train(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Train the model, save it and its tokenizer into `out_dir`, measure it, write `card.json`; return the card."""
    import transformers
    from tqdm.auto import tqdm

    import neuronmap as nm

    out_dir = Path(out_dir)
    settings = QUICK if quick else FULL
    start = time.perf_counter()
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ARCH,
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings["warmup"], settings["steps"]))
    model.train()
    progress = tqdm(range(settings["steps"]), desc=f"training {NAME}", mininterval=1.0)
    for _ in progress:
        batch = tokenizer([training_sentence(rng) for _ in range(settings["batch"])], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    train_seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics = measure(nm.load(model, tokenizer, name=NAME))
    card = {
        "name": NAME,
        "architecture": type(model).__name__,
        "task": "Indirect object identification: complete 'When Mary and John went to the store, John gave a drink to' "
        "with the name that is not repeated ('Mary').",
        "recipe": {
            "command": f"python -m neuronmap.zoo.train {NAME}",
            "seed": seed,
            "steps": settings["steps"],
            "batch_size": settings["batch"],
            "learning_rate": settings["lr"],
            "quick": quick,
            "data": _data_description(),
            "train_wall_time_s": round(train_seconds, 1),
            "final_train_loss": round(loss.item(), 4),
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "mechanisms": describe(metrics),
        "metrics": metrics,
    }
    card["recipe"]["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def measure(model: "neuronmap.Model", seed: int = SEED_MEASURE, n: int = 200) -> dict:
    """Score `n` fresh held-out prompts (held-out name pairs x held-out templates) and measure the mechanism.

    Accuracy counts a prompt as right when the indirect object's logit is the largest among all names (which
    implies it beats the subject's); `accuracy_io_over_s` counts IO logit > S logit alone. `logit_diff` is the
    mean of logit(IO) - logit(S) at the final position. Per head (`"L{layer}H{head}"`): mean attention from the
    final position to the IO token, the first and second S tokens and the start token; mean attention from S2 to
    S1; the change in mean logit difference when the head's `hook_z` is zeroed at every position; and the head's
    direct contribution to the logit difference (its output at the final position through the final LayerNorm's
    scale and the unembedding). `important_heads` are the heads whose ablation lowers the logit difference by at
    least `IMPORTANT_FRACTION` of its clean value, most important first. `name_gathering_heads`, the others, put at least
    `GATHER_ATTENTION` of their final-position attention on the names; they are also ablated together. `mlps`: each
    MLP's zero-ablation effect (`hook_mlp_out`) and direct contribution, measured as for the heads.
    """
    tokenizer = model.tokenizer
    prompts = heldout_prompts(n, seed)
    config = model.module.config
    n_layers, n_heads = config.n_layer, config.n_head
    io_ids = torch.tensor(tokenizer.convert_tokens_to_ids([p["io"] for p in prompts]))
    s_ids = torch.tensor(tokenizer.convert_tokens_to_ids([p["s"] for p in prompts]))
    name_ids = torch.tensor(tokenizer.convert_tokens_to_ids(NAMES))
    texts = [p["prompt"] for p in prompts]

    capture = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_z", f"blocks.{n_layers - 1}.hook_resid_post"]
    trace = model.run(texts, capture=capture, capture_device="cpu")
    rows = torch.arange(len(prompts))
    end = _last_positions(trace.attention_mask.cpu())
    io_pos, s1_pos, s2_pos = _name_positions(trace.tokens.cpu(), io_ids, s_ids)
    logits = trace.logits[rows, end].float().cpu()
    logit_diff = logits[rows, io_ids] - logits[rows, s_ids]
    best_name = name_ids[logits[:, name_ids].argmax(dim=1)]
    clean = logit_diff.mean().item()

    # The direct path: each head's output at the final position, through ln_f's scale (frozen from the clean run)
    # and the unembedding, projected on the IO - S direction.
    module = model.module
    resid = trace[f"blocks.{n_layers - 1}.hook_resid_post"][rows, end].float()
    ln_scale = (resid.var(dim=-1, unbiased=False) + module.transformer.ln_f.eps).rsqrt()
    unembed = _cpu(module.get_output_embeddings().weight)
    direction = (unembed[io_ids] - unembed[s_ids]) * _cpu(module.transformer.ln_f.weight) * ln_scale[:, None]

    heads: dict[str, dict[str, float]] = {}
    for layer in range(n_layers):
        pattern = trace[f"blocks.{layer}.attn.hook_pattern"].float()  # [batch, head, query, key]
        z = trace[f"blocks.{layer}.attn.hook_z"][rows, end].float()  # [batch, head, d_head]
        w_out = _cpu(module.transformer.h[layer].attn.c_proj.weight)  # Conv1D: [d_model (in), d_model (out)]
        d_head = z.shape[-1]
        for head in range(n_heads):
            from_end = pattern[rows, head, end]
            head_out = z[:, head] @ w_out[head * d_head : (head + 1) * d_head]
            ablated = _ablated_logit_diff(model, texts, end, io_ids, s_ids, {f"blocks.{layer}.attn.hook_z": _zero_heads([head])})
            heads[f"L{layer}H{head}"] = {
                "end_to_io": from_end[rows, io_pos].mean().item(),
                "end_to_s1": from_end[rows, s1_pos].mean().item(),
                "end_to_s2": from_end[rows, s2_pos].mean().item(),
                "end_to_bos": from_end[:, 0].mean().item(),
                "s2_to_s1": pattern[rows, head, s2_pos, s1_pos].mean().item(),
                "ablation_effect": ablated - clean,
                "direct_logit_diff": (head_out * direction).sum(-1).mean().item(),
            }
    ranked = sorted(heads, key=lambda h: heads[h]["ablation_effect"])
    important = [h for h in ranked if -heads[h]["ablation_effect"] >= IMPORTANT_FRACTION * abs(clean)]

    # Other heads that gather the names into the final position (most of their attention on IO, S1 or S2),
    # ablated together: redundant heads can each look unimportant alone.
    gatherers = [h for h in heads if h not in important and _name_attention(heads[h]) >= GATHER_ATTENTION]
    by_layer: dict[int, list[int]] = {}
    for h in gatherers:
        layer, head = map(int, h[1:].split("H"))
        by_layer.setdefault(layer, []).append(head)
    joint = {f"blocks.{layer}.attn.hook_z": _zero_heads(hs) for layer, hs in by_layer.items()}
    gatherers_effect = _ablated_logit_diff(model, texts, end, io_ids, s_ids, joint) - clean if joint else 0.0

    # The MLPs: zero-ablated one at a time, and their direct contribution through ln_f and the unembedding.
    mlps: dict[str, dict[str, float]] = {}
    mlp_outs = model.run(texts, capture="blocks.*.hook_mlp_out", capture_device="cpu")
    for layer in range(n_layers):
        out = mlp_outs[f"blocks.{layer}.hook_mlp_out"][rows, end].float()
        zeroed = _ablated_logit_diff(model, texts, end, io_ids, s_ids, {f"blocks.{layer}.hook_mlp_out": _zero})
        mlps[f"MLP{layer}"] = {"ablation_effect": zeroed - clean, "direct_logit_diff": (out * direction).sum(-1).mean().item()}
    return {
        "n_prompts": len(prompts),
        "seed": seed,
        "accuracy": (best_name == io_ids).float().mean().item(),
        "accuracy_io_over_s": (logit_diff > 0).float().mean().item(),
        "logit_diff": clean,
        "accuracy_definition": "IO logit is the largest among all names at the final position",
        "heldout": {"templates": len(HELDOUT_TEMPLATES), "name_pairs": len(split_pairs()[1])},
        "heads": heads,
        "important_heads": important,
        "name_gathering_heads": gatherers,
        "name_gathering_heads_joint_ablation_effect": gatherers_effect,
        "mlps": mlps,
        "important_threshold": f"zero-ablation lowers logit_diff by >= {IMPORTANT_FRACTION:.0%} of its clean value",
    }


def describe(metrics: dict) -> list[str]:
    """Human-readable sentences for the measured mechanism: the heads that matter, where they attend, what
    ablating them does. Every number comes from `metrics`."""
    heads = metrics["heads"]
    clean = metrics["logit_diff"]
    lines = [
        f"On fresh held-out prompts the model puts the indirect object above every other name in "
        f"{metrics['accuracy']:.1%} of cases, with mean logit difference IO - S of {clean:.2f}."
    ]
    for name in metrics["important_heads"]:
        h = heads[name]
        targets = {"the IO name": h["end_to_io"], "the first S name": h["end_to_s1"], "the second S name": h["end_to_s2"],
                   "the start token": h["end_to_bos"], "other tokens": 1.0 - _name_attention(h) - h["end_to_bos"]}
        where = max(targets, key=targets.get)
        lines.append(
            f"{name} matters: zero-ablating it changes the logit difference by {h['ablation_effect']:+.2f} "
            f"(to {clean + h['ablation_effect']:.2f}). From the final position it attends mostly to {where} "
            f"(IO {h['end_to_io']:.2f}, S1 {h['end_to_s1']:.2f}, S2 {h['end_to_s2']:.2f}, start {h['end_to_bos']:.2f}); "
            f"S2 attends to S1 with weight {h['s2_to_s1']:.2f}; its direct contribution to the logit difference is "
            f"{h['direct_logit_diff']:+.2f}{_role(h)}."
        )
    gatherers = metrics["name_gathering_heads"]
    if gatherers:
        spread = "; ".join(
            f"{n} IO {heads[n]['end_to_io']:.2f} / S1 {heads[n]['end_to_s1']:.2f} / S2 {heads[n]['end_to_s2']:.2f}"
            for n in gatherers
        )
        lines.append(
            f"Other heads attending from the final position mostly to the names ({spread}) bring those names there; "
            f"zero-ablating all of them together changes the logit difference by "
            f"{metrics['name_gathering_heads_joint_ablation_effect']:+.2f}."
        )
    for name, mlp in metrics["mlps"].items():
        lines.append(
            f"{name}: zero-ablating it changes the logit difference by {mlp['ablation_effect']:+.2f}; its direct "
            f"contribution to the logit difference at the final position is {mlp['direct_logit_diff']:+.2f}."
        )
    others = [n for n in heads if n not in metrics["important_heads"]]
    if others:
        largest = max(abs(heads[n]["ablation_effect"]) for n in others)
        lines.append(
            f"Zero-ablating any other head alone ({', '.join(others)}) changes the logit difference by at most {largest:.2f}."
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Data


def split_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) of unordered name pairs, fixed for the recipe (independent of the seed).

    Every name appears in training pairs; held-out pairs never occur together in any training sentence.
    """
    rng = random.Random(20240611)
    pairs = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1 :]]
    rng.shuffle(pairs)
    n_held = int(len(pairs) * HELDOUT_PAIR_FRACTION)
    held, train = sorted(pairs[:n_held]), sorted(pairs[n_held:])
    assert {n for pair in train for n in pair} == set(NAMES)
    return train, held


_SPLIT = split_pairs()
TRAIN_PAIRS, HELDOUT_PAIRS = _SPLIT


def ioi_prompt(template: str, io: str, s: str, order: str, place: str, obj: str) -> dict:
    """One IOI prompt (without its answer). `order` is "ABBA" (IO named first) or "BABA" (S named first)."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    prompt = template.format(A=a, B=b, S=s, place=place, object=obj)
    return {"prompt": prompt, "io": io, "s": s, "order": order, "template": template}


def flipped(prompt: dict) -> str:
    """`prompt`'s text with the second mention of S naming the indirect object instead, so the answer flips: the
    corrupted prompt of a patching experiment (same length, one token changed)."""
    text, s, io = prompt["prompt"], prompt["s"], prompt["io"]
    i = text.rindex(" " + s + " ")
    return text[:i] + " " + io + text[i + len(s) + 1 :]


def heldout_prompts(n: int, seed: int = SEED_MEASURE) -> list[dict]:
    """`n` IOI prompts from held-out name pairs and held-out templates, both orders, sampled with `seed`."""
    rng = random.Random(seed)
    return [_sample_ioi(rng, HELDOUT_TEMPLATES, HELDOUT_PAIRS, order=("ABBA", "BABA")[i % 2]) for i in range(n)]


def training_sentence(rng: random.Random) -> str:
    """One training text: an IOI sentence with its answer (training pairs, training templates) or other text,
    sometimes after a name-free sentence, so the model sees the structures at many absolute positions."""
    prefix = _other_sentence(rng, NAMELESS_TEMPLATES) + " " if rng.random() < PREFIX_FRACTION else ""
    if rng.random() < OTHER_FRACTION:
        return prefix + _other_sentence(rng, OTHER_TEMPLATES)
    example = _sample_ioi(rng, TRAIN_TEMPLATES, TRAIN_PAIRS, order=rng.choice(("ABBA", "BABA")))
    return f"{prefix}{example['prompt']} {example['io']}."


def build_tokenizer():
    """A word-level tokenizer over every word of the templates and fillers, splitting on whitespace and punctuation,
    prefixing `<s>`; wrapped as a `PreTrainedTokenizerFast` (right padding with `<pad>`)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    splitter = pre_tokenizers.Whitespace()
    words: set[str] = set(NAMES) | set(PLACES) | set(OBJECTS) | set(COUNT_WORDS)
    for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES + OTHER_TEMPLATES:
        text = template.replace("{", " ").replace("}", " ")
        words.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    words -= {"A", "B", "S", "place", "object", "count"} - set(NAMES)
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="right", model_max_length=ARCH["n_positions"],
    )


def _sample_ioi(rng: random.Random, templates: list[str], pairs: list[tuple[str, str]], order: str) -> dict:
    pair = rng.choice(pairs)
    io, s = pair if rng.random() < 0.5 else pair[::-1]
    return ioi_prompt(rng.choice(templates), io, s, order, rng.choice(PLACES), rng.choice(OBJECTS))


def _other_sentence(rng: random.Random, templates: list[str]) -> str:
    template = rng.choice(templates)
    if template == "{count}":
        start = rng.randrange(len(COUNT_WORDS) - 4)
        return " ".join(COUNT_WORDS[start : start + rng.randint(4, len(COUNT_WORDS) - start)]) + "."
    a, b = rng.choice(TRAIN_PAIRS)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return template.format(A=a, B=b, place=rng.choice(PLACES), object=rng.choice(OBJECTS))


def _data_description() -> str:
    return (
        f"{1 - OTHER_FRACTION:.0%} IOI sentences with their answer ({len(TRAIN_TEMPLATES)} training templates, "
        f"ABBA and BABA orders equally, {len(NAMES)} names, {len(TRAIN_PAIRS)} training name pairs, "
        f"{len(PLACES)} places, {len(OBJECTS)} objects) and {OTHER_FRACTION:.0%} other templated sentences "
        f"({len(OTHER_TEMPLATES)} templates: the same names, places and objects without the IOI structure, and counting); "
        f"{PREFIX_FRACTION:.0%} of texts start with a name-free sentence; sampled afresh every step, full next-token loss. Held out: {len(HELDOUT_TEMPLATES)} whole templates and "
        f"{len(HELDOUT_PAIRS)} name pairs (every name still appears in training)."
    )


# ---------------------------------------------------------------------------------------------------------------
# Measurement helpers


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1])
    return (positions * mask).argmax(dim=1)


def _name_positions(tokens: torch.Tensor, io_ids: torch.Tensor, s_ids: torch.Tensor):
    """Positions of the IO token and the first and second S tokens in each row (each prompt names IO once, S twice)."""
    io_hit = tokens == io_ids[:, None]
    s_hit = tokens == s_ids[:, None]
    if not (io_hit.sum(1) == 1).all() or not (s_hit.sum(1) == 2).all():
        raise ValueError("an IOI prompt must name the indirect object once and the subject twice")
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    io_pos = io_hit.long().argmax(dim=1)
    s1_pos = torch.where(s_hit, positions, tokens.shape[1]).min(dim=1).values
    s2_pos = torch.where(s_hit, positions, -1).max(dim=1).values
    return io_pos, s1_pos, s2_pos


def _role(head: dict[str, float]) -> str:
    """What a head's attention and direct effect together say it does (empty when they say nothing clear)."""
    subject, direct = head["end_to_s1"] + head["end_to_s2"], head["direct_logit_diff"]
    if subject >= GATHER_ATTENTION and direct > 0:
        return ", so it reads the subject's name and writes against it (it suppresses S)"
    if head["end_to_io"] >= GATHER_ATTENTION and direct > 0:
        return ", so it copies the IO name to the output (a name mover)"
    return ""


def _cpu(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().cpu()


def _name_attention(head: dict[str, float]) -> float:
    return head["end_to_io"] + head["end_to_s1"] + head["end_to_s2"]


def _zero_heads(heads: list[int]):
    def zero(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, heads] = 0.0
        return z

    return zero


def _zero(activation: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(activation)


def _ablated_logit_diff(model, texts, end, io_ids, s_ids, interventions) -> float:
    logits = model.run(texts, interventions=interventions).logits.cpu()
    rows = torch.arange(len(texts))
    final = logits[rows, end].float()
    return (final[rows, io_ids] - final[rows, s_ids]).mean().item()


def _warmup_cosine(warmup: int, total: int):
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
