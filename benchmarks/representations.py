"""Representation-analysis benchmark of issue 13, on the CPU: linear CKA of every pair of a GPT-2-small-sized model's
12 layers against torch-cka and a numpy implementation, and PCA of an activation store (NeuronMap streams it) against
scikit-learn's PCA of the same rows in memory, in time and peak memory.

    .repr-bench-venv/bin/python benchmarks/representations.py            # 10,240 tokens, 5 rounds; stores to 200k rows
    .repr-bench-venv/bin/python benchmarks/representations.py --quick    # a few minutes

Environment: `python3 -m venv .repr-bench-venv && .repr-bench-venv/bin/pip install -c constraints.txt -e . torch-cka
matplotlib` (torch-cka 0.21 imports matplotlib without declaring it).

CKA (`cka_rounds`): the model is `GPT2Config()`'s defaults (12 layers, d_model 768), random init (seed 0), run once
over random tokens (rows of 128) with `blocks.*.hook_resid_post` captured (`stop_early`). Timed, in interleaved rounds
(order rotated each round), on those captured activations, every call producing the 12 × 12 matrix:
- `nm.analysis.layer_similarity(trace, "blocks.*.hook_resid_post", method="cka")`, from the trace (`as_matrix`
  included), its default precision (`dtype=None`: products in the data's own float32, means and sums in float64),
  the same with `dtype=torch.float64` (exact float64 arithmetic), and the default with `debiased=True`;
- numpy: Kornblith et al.'s `feature_space_linear_cka` (their Colab's feature-space form: centre both, `|YᵀX|²_F /
  (|XᵀX|_F |YᵀY|_F)`) called for each of the 144 pairs, on the float32 arrays as captured, as a user writes it;
- torch-cka 0.21: `CKA(model1, model2).compare(loader)` whole, where the two "models" hand each layer's rows of a
  batch to torch-cka's forward hooks (the GPT-2 blocks return tuples, which its hooks cannot flatten), over a
  DataLoader of the same token rows (batch `--cka-batch`, not shuffled). It computes minibatch CKA (the mean
  unbiased HSIC of the batches, Nguyen et al. 2021) with n×n Gram matrices in float32. Its "arithmetic" is that
  minus the same loop over the loader and the two forwards without the CKA (timed in the same round).
Ratios are medians over rounds of (that call's wall time / NeuronMap's default biased CKA's) in the same round.
Values: NeuronMap's default matrix against its float64 one and against numpy's; torch-cka's against
`nm.analysis.minibatch_cka` with the same batch size (the same estimator) on row 0's 12 pairs, and against
NeuronMap's full debiased CKA.

PCA (`pca_memory`): a 2-layer GPT-2 (d_model 768, seed 0) is extracted into float16 stores of increasing size (hooks
`blocks.0/1.hook_resid_post`, kept in `--out-dir` for reruns). Each measurement runs in its own child process
(`--pca-repeats` per call and size, order rotated): the resident set after imports and opening the store, then the
call, then the high-water mark (`VmHWM`, which counts torch's, numpy's and HDF5's allocations alike); reported is the
growth. Calls: NeuronMap's `pca(store, hook, n_components=k)` (streamed; default precision, float32 products for
the float16 store, and `dtype=torch.float64`), scikit-learn's `PCA(k).fit_transform` of
`store[hook][:]` as float32 (the read included), scikit-learn's `IncrementalPCA(k)` fed block by block from the store
(`partial_fit`, then `transform`; smallest store only, it is slow), and `nm.analysis.minibatch_cka(hook_a, hook_b,
store=store)` (smallest and largest store). Ratios are medians over repeats of (that call's wall time /
NeuronMap's default PCA's in the same repeat). Each child also returns the top explained-variance ratios and
components, compared between NeuronMap's two precisions and with scikit-learn's PCA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # torch-cka's progress bar

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import resident, timed  # noqa: E402

import neuronmap as nm  # noqa: E402

HOOKS = "blocks.*.hook_resid_post"
CONTEXT = 128


# ---------------------------------------------------------------- CKA


def capture(tokens: int) -> nm.Trace:
    """`blocks.*.hook_resid_post` of a random GPT-2-small over `tokens` random tokens (rows of 128)."""
    torch.manual_seed(0)
    model = nm.load(transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval())
    ids = torch.randint(0, 50257, (max(1, tokens // CONTEXT), CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.run(ids, capture=HOOKS, stop_early=True)


def feature_space_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space linear CKA (their Colab), as a user copies it."""
    x = x - np.mean(x, 0, keepdims=True)
    y = y - np.mean(y, 0, keepdims=True)
    dot_product_similarity = np.linalg.norm(x.T.dot(y)) ** 2
    normalization_x = np.linalg.norm(x.T.dot(x))
    normalization_y = np.linalg.norm(y.T.dot(y))
    return dot_product_similarity / (normalization_x * normalization_y)


def numpy_matrix(layers: list[np.ndarray]) -> np.ndarray:
    return np.array([[feature_space_linear_cka(a, b) for b in layers] for a in layers])


class _Layers(torch.nn.Module):
    """A "model" for torch-cka: its child `i` outputs layer `i`'s rows of the batch `[batch, layers, d]`, which
    torch-cka's forward hooks record."""

    def __init__(self, count: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(count))

    def forward(self, batch: torch.Tensor) -> None:
        for i, layer in enumerate(self.layers):
            layer(batch[:, i])


def torch_cka_parts(stacked: torch.Tensor, batch: int):
    """torch-cka's whole `compare()`, and the same loop over the loader and forwards without its CKA."""
    import warnings

    from torch_cka import CKA
    from torch.utils.data import DataLoader, TensorDataset

    names = [f"layers.{i}" for i in range(stacked.shape[1])]
    loader = DataLoader(TensorDataset(stacked), batch_size=batch, shuffle=False)

    def compare() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cka = CKA(_Layers(len(names)), _Layers(len(names)), "a", "b", names, names)
            cka.compare(loader, loader)
        return cka.hsic_matrix

    def loop_only() -> None:
        a, b = _Layers(len(names)), _Layers(len(names))
        for (x1,), (x2,) in zip(loader, loader):
            a(x1)
            b(x2)

    return compare, loop_only


def cka_rounds(tokens: int, rounds: int, batch: int, check_pairs: int) -> dict:
    print(f"CKA: capturing {HOOKS} over {tokens:,} tokens", flush=True)
    trace = capture(tokens)
    hooks = [name for name in trace.keys()]
    layers32 = [trace[h].flatten(0, 1).numpy() for h in hooks]
    stacked = torch.stack([torch.from_numpy(m) for m in layers32], 1)  # [rows, layers, d]
    n = len(stacked)
    compare, loop_only = torch_cka_parts(stacked, batch)
    calls = {
        "neuronmap": lambda: nm.analysis.layer_similarity(trace, HOOKS, method="cka").to_numpy(),
        "neuronmap float64":
            lambda: nm.analysis.layer_similarity(trace, HOOKS, method="cka", dtype=torch.float64).to_numpy(),
        "neuronmap debiased":
            lambda: nm.analysis.layer_similarity(trace, HOOKS, method="cka", debiased=True).to_numpy(),
        "numpy": lambda: numpy_matrix(layers32),
        "torch-cka compare()": lambda: compare().numpy(),
        "torch-cka loop only": loop_only,
    }
    walls = {k: [] for k in calls}
    cpus = {k: [] for k in calls}
    out = {}
    names = list(calls)
    for round_ in range(rounds):
        start = time.perf_counter()
        for key in names[round_ % len(names):] + names[: round_ % len(names)]:
            wall, cpu, out[key] = timed(calls[key])
            walls[key].append(wall)
            cpus[key].append(cpu)
            print(f"    {key}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
        print(f"  round {round_ + 1}/{rounds}: {time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}",
              flush=True)
    for record in (walls, cpus):
        record["torch-cka arithmetic"] = [
            c - lo for c, lo in zip(record["torch-cka compare()"], record["torch-cka loop only"])
        ]
    base = walls["neuronmap"]
    times = {
        key: {
            "wall_s": statistics.median(walls[key]), "cpu_s": statistics.median(cpus[key]),
            "walls": walls[key], "x_neuronmap": statistics.median(w / b for w, b in zip(walls[key], base)),
        }
        for key in walls
    }
    reference = [
        nm.analysis.minibatch_cka(stacked[:, 0], stacked[:, j], batch_size=batch) for j in range(check_pairs)
    ]
    torch_cka = out["torch-cka compare()"]
    agreement = {
        "neuronmap vs neuronmap float64 (all pairs)":
            float(np.abs(out["neuronmap"] - out["neuronmap float64"]).max()),
        "neuronmap vs numpy (all pairs)": float(np.abs(out["neuronmap"] - out["numpy"]).max()),
        "neuronmap float64 vs numpy (all pairs)": float(np.abs(out["neuronmap float64"] - out["numpy"]).max()),
        f"torch-cka vs nm.minibatch_cka(batch_size={batch}) (row 0, {check_pairs} pairs)":
            float(np.abs(torch_cka[0, :check_pairs] - np.array(reference)).max()),
        "torch-cka vs neuronmap debiased (all pairs; different estimator)":
            float(np.abs(torch_cka - out["neuronmap debiased"]).max()),
        "neuronmap debiased vs neuronmap (all pairs)":
            float(np.abs(out["neuronmap debiased"] - out["neuronmap"]).max()),
    }
    return {"tokens": n, "layers": len(hooks), "batch": batch, "rounds": rounds, "times": times,
            "agreement": agreement, "matrix_row0": out["neuronmap"][0].tolist()}


# ---------------------------------------------------------------- PCA and streaming memory


def store_of(rows: int, out_dir: Path) -> Path:
    """A float16 store of `rows` tokens at blocks.0/1.hook_resid_post of a 2-layer GPT-2 (made once, reused)."""
    path = out_dir / f"store-{rows}.h5"
    torch.manual_seed(0)
    model = nm.load(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2)).eval())
    ids = torch.randint(0, 50257, (rows // CONTEXT, CONTEXT), generator=torch.Generator().manual_seed(2))
    start = time.perf_counter()
    nm.extract(model, ids, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], path, batch_size=32,
               context_length=CONTEXT, progress=False).close()
    print(f"  store of {rows:,} rows ready in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def child(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process: resident set before, the call's time and peak, and its result."""
    torch.set_num_threads(args.threads)
    import sklearn.decomposition  # imported before the baseline, like torch and neuronmap
    hook, k = "blocks.1.hook_resid_post", args.components
    store = nm.ActivationStore(args.store)
    before = resident()

    def neuronmap_pca(dtype=None):
        p = nm.analysis.pca(store, hook, n_components=k, dtype=dtype)
        return p.explained_variance_ratio[:k].numpy(), p.components.numpy()

    def sklearn_pca():
        model = sklearn.decomposition.PCA(k, random_state=0)
        model.fit_transform(store[hook][:].float().numpy())
        return model.explained_variance_ratio_, model.components_

    def sklearn_incremental():
        model = sklearn.decomposition.IncrementalPCA(k)
        view = store[hook]
        for start in range(0, len(view), 4096):
            model.partial_fit(view.to_torch(view.read(start, start + 4096)).float().numpy())
        for start in range(0, len(view), 4096):
            model.transform(view.to_torch(view.read(start, start + 4096)).float().numpy())
        return model.explained_variance_ratio_, model.components_

    def minibatch_cka():
        return nm.analysis.minibatch_cka("blocks.0.hook_resid_post", hook, store=store), None

    call = {"neuronmap pca": neuronmap_pca, "neuronmap pca float64": lambda: neuronmap_pca(torch.float64),
            "sklearn PCA": sklearn_pca, "sklearn IncrementalPCA": sklearn_incremental,
            "neuronmap minibatch_cka": minibatch_cka}[args.method]
    wall, cpu, (ratio, components) = timed(call)
    after = resident()
    return {
        "rows": len(store), "wall_s": wall, "cpu_s": cpu, "rss_before_mb": before["VmRSS"] / 2**20,
        "peak_growth_mb": (after["VmHWM"] - before["VmRSS"]) / 2**20,
        "ratio": np.asarray(ratio, dtype=float).tolist(),
        "components": None if components is None else np.asarray(components, dtype=float).tolist(),
    }


def pca_memory(sizes: list[int], components: int, out_dir: Path, threads: int, repeats: int) -> dict:
    """Every call at every store size, `repeats` times (one child process each, the calls' order rotated each
    repeat): medians of time and peak growth, and of each call's wall time over NeuronMap's default PCA's in its
    repeat."""
    results = {}
    methods = ["neuronmap pca", "neuronmap pca float64", "sklearn PCA", "sklearn IncrementalPCA",
               "neuronmap minibatch_cka"]
    for size in sizes:
        path, rows = store_of(size, out_dir), size // CONTEXT * CONTEXT
        chosen = [m for m in methods if not (m == "neuronmap minibatch_cka" and size not in (sizes[0], sizes[-1])
                                             or m == "sklearn IncrementalPCA" and size != sizes[0])]  # slow
        runs = {method: [] for method in chosen}
        for repeat in range(repeats):
            for method in chosen[repeat % len(chosen):] + chosen[: repeat % len(chosen)]:
                command = [sys.executable, __file__, "--phase", "child", "--store", str(path), "--method", method,
                           "--components", str(components), "--threads", str(threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr[-3000:], flush=True)
                    raise SystemExit(f"{method} failed on {path}")
                record = json.loads(done.stdout.strip().splitlines()[-1])
                runs[method].append(record)
                print(f"    {rows:,} rows, {method}: {record['wall_s']:.1f} s, "
                      f"peak +{record['peak_growth_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}", flush=True)
        for method, records in runs.items():
            results.setdefault(method, {})[rows] = {
                "wall_s": statistics.median(r["wall_s"] for r in records),
                "cpu_s": statistics.median(r["cpu_s"] for r in records),
                "peak_growth_mb": statistics.median(r["peak_growth_mb"] for r in records),
                "peak_growth_mb_all": [round(r["peak_growth_mb"], 1) for r in records],
                "x_neuronmap": statistics.median(
                    r["wall_s"] / ref["wall_s"] for r, ref in zip(records, runs["neuronmap pca"])),
                "rss_before_mb": records[0]["rss_before_mb"], "ratio": records[0]["ratio"],
                "components": records[0]["components"],
            }
        pairs = [("neuronmap pca", "neuronmap pca float64"), ("neuronmap pca", "sklearn PCA"),
                 ("neuronmap pca float64", "sklearn PCA"), ("neuronmap pca", "sklearn IncrementalPCA")]
        for ours, reference in pairs:
            theirs = results.get(reference, {}).get(rows)
            if theirs is not None:
                results.setdefault("agreement", {})[f"{rows:,} rows, {ours} vs {reference}"] = _agreement(
                    results[ours][rows], theirs)
    for records in results.values():
        for record in records.values():
            record.pop("components", None)
    return results


def _agreement(a: dict, b: dict) -> dict:
    """Largest difference of the explained-variance ratios, and each component's |cosine| with its counterpart."""
    x, y = np.array(a["components"]), np.array(b["components"])
    cosines = np.abs((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    return {"ratio_max_abs_diff": float(np.abs(np.array(a["ratio"]) - b["ratio"]).max()),
            "abs_cos": cosines.round(6).tolist()}


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = []
    cka = result.get("cka")
    if cka:
        lines += [f"### Linear CKA, {cka['layers']} × {cka['layers']} layers, {cka['tokens']:,} tokens, "
                  f"{cka['rounds']} interleaved rounds (torch-cka batch {cka['batch']})", "",
                  "| call | wall s (median) | CPU s (median) | × NeuronMap default's wall time (median of per-round "
                  "ratios) |",
                  "|---|---:|---:|---:|"]
        for key, t in cka["times"].items():
            lines.append(f"| {key} | {t['wall_s']:.2f} | {t['cpu_s']:.2f} | {t['x_neuronmap']:.2f} |")
        lines += ["", "| values | max abs difference |", "|---|---:|"]
        lines += [f"| {key} | {value:.2e} |" for key, value in cka["agreement"].items()]
        lines.append("")
    pca = result.get("pca")
    if pca:
        sizes = sorted({int(rows) for method, records in pca.items() if method != "agreement" for rows in records})
        lines += [f"### PCA ({result['components']} components) and minibatch CKA over a store: wall time (CPU; × "
                  "NeuronMap default PCA's wall time), peak memory growth, medians over child processes", "",
                  "| call | " + " | ".join(f"{rows:,} rows" for rows in sizes) + " |",
                  "|---|" + "---:|" * len(sizes)]
        for method, records in pca.items():
            if method == "agreement":
                continue
            cells = []
            for rows in sizes:
                r = records.get(rows) or records.get(str(rows))
                if r is None:
                    cells.append("")
                else:
                    cells.append(f"{r['wall_s']:.2f} s (CPU {r['cpu_s']:.2f}; ×{r['x_neuronmap']:.2f}), "
                                 f"+{r['peak_growth_mb']:.0f} MB")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "| rows, against | max abs diff of explained-variance ratios | abs cos of each component |",
                  "|---|---:|---|"]
        for key, r in pca.get("agreement", {}).items():
            lines.append(f"| {key} | {r['ratio_max_abs_diff']:.1e} | {' '.join(f'{c:.6f}' for c in r['abs_cos'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, rounds and store rows (a few minutes)")
    parser.add_argument("--tokens", type=int, default=10_240)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cka-batch", type=int, default=256, help="torch-cka's DataLoader batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000], help="store rows")
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--pca-repeats", type=int, default=3, help="child processes per call and store size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", choices=["cka", "pca"], help="leave one half out")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/neuronmap-repr-bench"))
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--phase", choices=["main", "child"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "child":
        print(json.dumps(child(args)))
        return None
    if args.quick:
        args.tokens, args.rounds, args.sizes, args.pca_repeats = 4096, 2, [20_000, 60_000], 1
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_before": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
              "components": args.components}
    if args.skip != "cka":
        result["cka"] = cka_rounds(args.tokens, args.rounds, args.cka_batch, check_pairs=12)
    if args.skip != "pca":
        print(f"PCA: stores of {args.sizes} rows in {args.out_dir}", flush=True)
        result["pca"] = pca_memory(args.sizes, args.components, args.out_dir, args.threads, args.pca_repeats)
    result["machine"]["load_after"] = os.getloadavg()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
