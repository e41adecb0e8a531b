"""CPU benchmark: gradients at hook points and generation with interventions, against bare HF in the same process.

Run from the repository root::

    python benchmarks/gradients_and_generation.py            # 7 rounds
    python benchmarks/gradients_and_generation.py --rounds 3

Model: a randomly initialised GPT-2-small-sized ``GPT2LMHeadModel`` (12 layers, d_model 768, 12 heads, vocab
50257, seed 0, SDPA attention). Nothing is downloaded.

Gradients (batch 4 x 128 tokens, metric = a logit difference at the last position, one forward + one backward):

* ``hf-backward``      bare HF forward and backward of the metric: the reference
* ``hooks-retain``     plain torch hooks keeping every block's output with ``retain_grad`` (the hand-written floor)
* ``nm-grad-resid``    ``model.run(tokens, capture_grad="blocks.*.hook_resid_post")``, then ``.backward()``
* ``nm-grad-resid-z``  the same plus every layer's per-head ``attn.hook_z``

Generation (1 x 64-token prompt, 32 new tokens, greedy):

* ``hf-generate``      ``module.generate(..., use_cache=True)``: the reference
* ``nm-generate``      ``model.generate`` with a steering vector added to every ``hook_resid_post`` (KV cache on)
* ``nm-loop``          the same intervention through a loop of cache-free ``model.run`` calls, one per new token
                       (what one writes without ``generate``)

Variants run round-robin, each round starting at the next variant. Reported: median wall time, median CPU time
(``time.process_time``) and the median of the per-round ratio to the reference measured in the same round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import neuronmap as nm  # noqa: E402

N_LAYER = 12
A, B = 11, 22  # the metric's answer tokens
NEW_TOKENS = 32


def build_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=N_LAYER, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, A] - logits[:, -1, B]).sum()


def gradient_variants(module: torch.nn.Module, tokens: torch.Tensor) -> dict[str, Callable[[], object]]:
    model = nm.load(module)

    def hf_backward():
        metric(module(tokens, use_cache=False).logits).backward()

    def hooks_retain():
        kept = []

        def keep(mod, args, output):
            output.retain_grad()
            kept.append(output)

        handles = [block.register_forward_hook(keep) for block in module.transformer.h]
        try:
            metric(module(tokens, use_cache=False).logits).backward()
        finally:
            for handle in handles:
                handle.remove()
        return [t.grad for t in kept]

    def nm_grad(names):
        def run():
            trace = model.run(tokens, capture_grad=names)
            metric(trace.logits).backward()
            return trace.grads

        return run

    return {
        "hf-backward": hf_backward,
        "hooks-retain": hooks_retain,
        "nm-grad-resid": nm_grad("blocks.*.hook_resid_post"),
        "nm-grad-resid-z": nm_grad(["blocks.*.hook_resid_post", "blocks.*.attn.hook_z"]),
    }


def generation_variants(module: torch.nn.Module, prompt: torch.Tensor) -> dict[str, Callable[[], object]]:
    model = nm.load(module)
    steering = torch.randn(module.config.n_embd, generator=torch.Generator().manual_seed(1))
    interventions = {"blocks.*.hook_resid_post": lambda resid, hook: resid + steering}

    def hf_generate():
        with torch.no_grad():
            return module.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)

    def nm_generate():
        return model.generate(prompt, NEW_TOKENS, interventions=interventions)

    def nm_loop():
        tokens = prompt
        for _ in range(NEW_TOKENS):
            logits = model.run(tokens, interventions=interventions).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens

    return {"hf-generate": hf_generate, "nm-generate": nm_generate, "nm-loop": nm_loop}


def timed(call: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(variants: dict[str, Callable[[], object]], reference: str, rounds: int) -> list[str]:
    names = list(variants)
    for call in variants.values():
        call()  # warm-up
    walls = {name: [] for name in names}
    cpus = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for round_ in range(rounds):
        this_round = {}
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            wall, cpu = timed(variants[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            this_round[name] = wall
        for name in names:
            ratios[name].append(this_round[name] / this_round[reference])
    lines = [f"{'variant':18} {'median wall':>12} {'median CPU':>11} {'ratio to ' + reference:>22}"]
    for name in names:
        lines.append(
            f"{name:18} {statistics.median(walls[name]) * 1e3:10.1f} ms {statistics.median(cpus[name]) * 1e3:9.1f} ms "
            f"{statistics.median(ratios[name]):21.2f}x"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    module = build_model()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (4, 128), generator=generator)
    prompt = torch.randint(0, 50257, (1, 64), generator=generator)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("\ngradients: 4 x 128 tokens, one forward + one backward")
    print("\n".join(measure(gradient_variants(module, tokens), "hf-backward", args.rounds)))
    print(f"\ngeneration: 1 x 64-token prompt, {NEW_TOKENS} new tokens, greedy")
    print("\n".join(measure(generation_variants(module, prompt), "hf-generate", args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
