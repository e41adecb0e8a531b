"""Activation-store benchmark: extraction throughput against the bare forward pass over the same batches, peak
memory, file size, and shuffled read-back throughput, on a GPT-2-small-sized random model on the CPU.

    python benchmarks/store.py                       # ~200k tokens, 3 interleaved rounds of 32k tokens
    python benchmarks/store.py --tokens 20000 --round-tokens 4096 --rounds 2   # a quick check

Throughput is measured in interleaved rounds (order rotated each round) on the same batches: the bare forward
with logits (what the issue compares to), the bare forward without the unembedding (what extraction really has to
run, since it stops after the last hook), and `nm.extract` of `blocks.*.hook_resid_post` in float16. The full-size
extraction then runs once in a child process for its peak resident set, file size and read-back speed.
SAELens's activation cache is measured by `benchmarks/store_saelens.py` in its own environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import resident, timed  # noqa: E402

import neuronmap as nm  # noqa: E402



def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return transformers.GPT2LMHeadModel(config).eval()


def data(tokens: int, context: int, seed: int = 1) -> torch.Tensor:
    rows = max(1, tokens // context)
    return torch.randint(0, 50257, (rows, context), generator=torch.Generator().manual_seed(seed))


def bare(module: torch.nn.Module, rows: torch.Tensor, batch: int, body_only: bool) -> None:
    run = module.transformer if body_only else module
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            run(input_ids=rows[start : start + batch], use_cache=False)


def extract(model: nm.Model, rows: torch.Tensor, args: argparse.Namespace, path: Path,
            compression: str | None = None) -> nm.ActivationStore:
    return nm.extract(model, rows, args.hooks, path, batch_size=args.batch, context_length=rows.shape[1],
                      dtype=torch.float16, compression=compression, overwrite=True, progress=False)


def throughput(args: argparse.Namespace, out: Path) -> dict:
    module = build()
    model = nm.load(module)
    rows = data(args.round_tokens, args.context, seed=2)
    calls = {
        "bare forward (logits)": lambda: bare(module, rows, args.batch, body_only=False),
        "bare forward (no unembedding)": lambda: bare(module, rows, args.batch, body_only=True),
        "extract": lambda: extract(model, rows, args, out / "round.h5").close(),
    }
    if args.lzf:
        calls["extract, lzf"] = lambda: extract(model, rows, args, out / "round.h5", "lzf").close()
    walls = {name: [] for name in calls}
    cpus = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            wall, cpu, _ = timed(calls[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"  round {round_ + 1}: {name}: {wall:.1f} s", flush=True)
    tokens = rows.numel()
    reference = walls["bare forward (logits)"]
    body = walls["bare forward (no unembedding)"]
    return {
        name: {
            "wall_s": statistics.median(walls[name]),
            "cpu_s": statistics.median(cpus[name]),
            "tokens_per_s": tokens / statistics.median(walls[name]),
            "throughput_vs_forward": statistics.median(r / w for r, w in zip(reference, walls[name])),
            "throughput_vs_body": statistics.median(b / w for b, w in zip(body, walls[name])),
        }
        for name in names
    } | {"round_tokens": tokens}


def full_size(args: argparse.Namespace, out: Path) -> dict:
    """The full extraction (run in a child process so its resident set is its own), then shuffled read-back."""
    module = build()
    model = nm.load(module)
    rows = data(args.tokens, args.context)
    before = resident()
    bare(module, rows[: 4 * args.batch], args.batch, body_only=False)  # the forward's own high-water mark
    forward_peak = resident()["VmHWM"]
    wall, cpu, store = timed(lambda: extract(model, rows, args, out / "full.h5"))
    after = resident()
    size = os.path.getsize(out / "full.h5")
    read = {}
    for label, hooks in ((f"all {len(store.hooks)} hooks", None), ("one hook", store.hooks[-1])):
        start = time.perf_counter()
        served = sum(len(b if hooks else next(iter(b.values()))) for b in store.batches(hooks, 4096, seed=0))
        seconds = time.perf_counter() - start
        read[label] = {"rows_per_s": served / seconds, "seconds": seconds, "rows": served}
    return {
        "tokens": len(store), "wall_s": wall, "cpu_s": cpu, "tokens_per_s": len(store) / wall,
        "rss_before_mb": before["VmRSS"] / 2**20, "peak_rss_mb": after["VmHWM"] / 2**20,
        "peak_rss_growth_mb": (after["VmHWM"] - before["VmRSS"]) / 2**20,
        "bare_forward_peak_rss_growth_mb": (forward_peak - before["VmRSS"]) / 2**20, "file_bytes": size,
        "read_back": read, "store": repr(store),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", default="blocks.*.hook_resid_post", help="hook name or pattern to extract")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--round-tokens", type=int, default=32_768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lzf", action="store_true", help="also time extraction with lzf compression")
    parser.add_argument("--out-dir", default="/tmp/neuronmap-store-bench")
    parser.add_argument("--phase", choices=["all", "full"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "full":
        print(json.dumps(full_size(args, out)))
        return
    print(f"throughput: {args.rounds} interleaved rounds of {args.round_tokens:,} tokens", flush=True)
    result = {"throughput": throughput(args, out)}
    print(f"full size: {args.tokens:,} tokens in a child process", flush=True)
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", "full"], capture_output=True,
                           text=True, check=True)
    result["full"] = json.loads(child.stdout.strip().splitlines()[-1])
    forward = result["throughput"]["bare forward (logits)"]["tokens_per_s"]
    for read in result["full"]["read_back"].values():
        read["vs_forward"] = read["rows_per_s"] / forward
    print(json.dumps(result, indent=1))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
