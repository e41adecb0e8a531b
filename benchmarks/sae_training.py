"""One SAE training step, 768 → 6144 latents on batches of 4096 activations, CPU: NeuronMap's trainer against a
hand-written minimal step and against SAELens's trainer, in interleaved rounds.

    .saelens-venv/bin/python benchmarks/sae_training.py --rounds 9 --threads 2

(the SAELens environment: `python3 -m venv .saelens-venv && .saelens-venv/bin/pip install -c constraints.txt
sae-lens -e .`; without SAELens installed its rows are left out). `run(...)` returns the rows for
`benchmarks/sae.py`.

Per architecture (ReLU + L1; ReLU + L1 with about 1% of latents active, as after training, by starting every method
with b_enc = −2.33 (pre-activations are about N(b_enc, 1) on this data); TopK with k = 32), each method keeps its own
SAE and Adam state, initialised alike, and steps on the same four random batches in turn:
  hand        the minimal step written out below: encode, activation, decode, loss, `loss.backward()`,
              `torch.optim.Adam` (its default implementation), decoder rows renormalised;
  hand+fused  the same with `torch.optim.Adam(..., fused=True)`: how much of the difference the optimiser makes;
  neuronmap   `neuronmap.sae.training.Trainer.step` with the maths of `hand` (ReLU: plain L1 and unit-norm decoder;
              TopK: no dead latents yet, so no auxiliary loss) plus what its method adds: the gradient along each
              decoder row projected out before the step, dead-latent tracking; counting the active latents only
              on logging steps as `train` does (`measure=False`); its gradients equal autograd's on the same loss
              (tests/test_sae_architectures.py);
  saelens     `SAETrainer.step` of SAELens's `StandardTrainingSAE` / `TopKTrainingSAE` with their defaults (L1
              weighted by decoder norms, no renormalisation, gradient clipping, the TopK decoder-norm rescaling).
Every round runs each (architecture, method) once, in an order rotated each round, after two untimed warm-up
steps each. Reported: median wall and CPU time per step, tokens/s, and the median over rounds of the paired ratio
hand / method (throughput relative to the hand-written step; > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

D_IN, D_SAE, BATCH, K, L1, LR = 768, 6144, 4096, 32, 5.0, 1e-4
ARCHITECTURES = ("relu", "relu-sparse", "topk")
SPARSE_B_ENC = -2.326  # P(N(0, 1) > 2.326) = 1%: the share of latents active in "relu-sparse"
METHODS = ("hand", "hand+fused", "neuronmap", "saelens")


def run(rounds: int = 9, threads: int = 2, architectures: tuple[str, ...] = ARCHITECTURES, k: int = K,
        progress: bool = True) -> list[dict]:
    """Time every method on every architecture; one row per (architecture, method)."""
    torch.set_num_threads(threads)
    batches = [torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    steps: dict[tuple[str, str], Callable[[torch.Tensor], None]] = {}
    for arch in architectures:
        for method in METHODS:
            step = _BUILDERS[method](arch, k)
            if step is not None:
                steps[(arch, method)] = step
    for key, step in steps.items():  # warm-up: allocator, thread pools, Adam's state
        for i in range(2):
            step(batches[i])
    keys = list(steps)
    wall = {key: [] for key in keys}
    cpu = {key: [] for key in keys}
    for round_ in range(rounds):
        order = keys[round_ % len(keys):] + keys[: round_ % len(keys)]
        for key in order:
            x = batches[round_ % len(batches)]
            w, c = time.perf_counter(), time.process_time()
            steps[key](x)
            wall[key].append(time.perf_counter() - w)
            cpu[key].append(time.process_time() - c)
        if progress:
            print(f"  round {round_ + 1}/{rounds}: " + ", ".join(f"{a} {m} {wall[(a, m)][-1]:.2f}s" for a, m in keys),
                  flush=True)
    rows = []
    for arch, method in keys:
        hand_wall, hand_cpu = wall[(arch, "hand")], cpu[(arch, "hand")]
        w, c = wall[(arch, method)], cpu[(arch, method)]
        rows.append({
            "architecture": arch, "method": method, "wall_ms": 1e3 * statistics.median(w),
            "cpu_ms": 1e3 * statistics.median(c), "tokens_per_s": BATCH / statistics.median(w),
            "vs_hand": statistics.median(h / m for h, m in zip(hand_wall, w)),
            "vs_hand_cpu": statistics.median(h / m for h, m in zip(hand_cpu, c)),
            "rounds": rounds, "threads": threads, "k": k if arch == "topk" else None,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | method | tokens/s | wall ms/step | CPU ms/step | × hand-written (wall) | × hand-written (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        arch = {"topk": f"TopK (k={r['k']})", "relu": "ReLU + L1", "relu-sparse": "ReLU + L1, 1% active"}[r["architecture"]]
        lines.append(f"| {arch} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['wall_ms']:,.0f} | {r['cpu_ms']:,.0f} | "
                     f"{r['vs_hand']:.2f} | {r['vs_hand_cpu']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    args = parser.parse_args(argv)
    rows = run(args.rounds, args.threads, tuple(args.architectures.split(",")), args.k)
    print(markdown(rows))
    if args.json:
        print(json.dumps(rows))
    return rows


# --- the methods ---------------------------------------------------------------------------------------------------


def _initial_weights(arch: str) -> tuple[torch.Tensor, ...]:
    """W_enc, b_enc, W_dec, b_dec as every method starts: unit-norm random decoder rows, W_enc = W_decᵀ, zero biases
    (b_enc at `SPARSE_B_ENC` for "relu-sparse")."""
    W_dec = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(0))
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    b_enc = torch.full((D_SAE,), SPARSE_B_ENC if arch == "relu-sparse" else 0.0)
    return W_dec.T.contiguous(), b_enc, W_dec, torch.zeros(D_IN)


def _hand(arch: str, k: int, fused: bool = False) -> Callable[[torch.Tensor], None]:
    W_enc, b_enc, W_dec, b_dec = params = [torch.nn.Parameter(t.clone()) for t in _initial_weights(arch)]
    optimizer = torch.optim.Adam(params, lr=LR, fused=fused or None)

    def step(x: torch.Tensor) -> None:
        pre = (x - b_dec) @ W_enc + b_enc
        if arch == "topk":
            values, indices = pre.topk(k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        else:
            acts = pre.relu()
        recons = acts @ W_dec + b_dec
        loss = (recons - x).pow(2).sum(-1).mean()
        if arch != "topk":
            loss = loss + L1 * acts.sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))

    return step


def _neuronmap(arch: str, k: int) -> Callable[[torch.Tensor], None]:
    from neuronmap.sae import SAE
    from neuronmap.sae.training import Trainer

    sae = SAE("topk" if arch == "topk" else "standard", D_IN, D_SAE, k=k if arch == "topk" else None)
    with torch.no_grad():
        for parameter, value in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), _initial_weights(arch)):
            parameter.copy_(value)
    trainer = Trainer(sae, 10**6, lr=LR, lr_decay_steps=0, l1_coefficient=L1, l1_by_decoder_norm=False,
                      sparsity_warmup_steps=0, unit_norm_decoder=True, dead_after_tokens=10**9)
    return lambda x: trainer.step(x, measure=False)


def _saelens(arch: str, k: int) -> Callable[[torch.Tensor], None] | None:
    try:
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError:
        return None
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, device="cpu"))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1, device="cpu"))
    with torch.no_grad():
        for parameter, value in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), _initial_weights(arch)):
            parameter.copy_(value)
    config = SAETrainerConfig(total_training_samples=10**12, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                              device="cpu", logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(config, sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1  # as SAETrainer.fit does after each step

    return step


_BUILDERS = {
    "hand": _hand,
    "hand+fused": lambda arch, k: _hand(arch, k, fused=True),
    "neuronmap": _neuronmap,
    "saelens": _saelens,
}


if __name__ == "__main__":
    main()
