"""CPU benchmark: activation-capture overhead of neuronmap vs. bare HF and peer libraries.

Run from the repository root::

    python benchmarks/capture_overhead.py            # full run (7 rounds)
    python benchmarks/capture_overhead.py --quick    # smoke run (2 rounds)
    python benchmarks/capture_overhead.py --help     # filters, --rounds, --no-memory, --json

Model: a randomly initialised GPT-2-small-sized ``GPT2LMHeadModel`` (12 layers, d_model 768,
12 heads, vocab 50257, seed 0, eval mode, SDPA attention). Nothing is downloaded.
Workloads: random token ids, batch 8 x 128 tokens and 1 x 1024 tokens.

Variants (all timed in this one process, under ``torch.inference_mode()``):

* ``hf-sdpa``      bare HF forward, SDPA attention -- the reference every ratio is taken against
* ``hf-eager``     bare HF forward, eager attention, same weights
* ``torch-hooks``  plain ``register_forward_hook`` on the 12 blocks (a floor for resid capture)
* ``nm-resid``     ``nm.load(model).run(tokens, capture="blocks.*.hook_resid_post")``
* ``nm-all``       ``nm.load(model).run(tokens, capture="*")`` (every hook point)
* ``tl-forward``   TransformerLens 4.x ``TransformerBridge`` forward without caching
* ``tl-resid``     ``bridge.run_with_cache(tokens, names_filter=<12 resid_post names>)``
* ``tl-all``       ``bridge.run_with_cache(tokens)`` (full cache)
* ``nnsight-resid`` ``NNsight(model).trace(tokens)`` saving every block's ``.output``

Every HF-backed call passes ``use_cache=False`` (no KV cache); neuronmap is called as a user would.
Variants run round-robin; each round starts at the next variant, so drift and thermal
noise are spread evenly. Reported per variant and workload:

* median (and minimum) wall time and median CPU time (``time.process_time``, all threads);
* median of the per-round ratio of wall time to ``hf-sdpa`` in the same round;
* peak RSS rise of one warm call, measured in a fresh child process per variant and workload:
  the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``) after a warm-up call,
  then one call is made and held, and ``VmHWM - VmRSS(before)`` is reported. The child runs with
  a fixed glibc mmap threshold so freed tensors go back to the OS and warm calls cannot hide in
  reused heap.
  "Retained" is the RSS still held after the warm-up call's results are freed (state kept
  between calls, e.g. a cached attention pattern, plus one-time allocations);
* bytes captured: sum of ``numel * element_size`` of the returned captured tensors (and the
  de-duplicated total when some entries alias the same storage).

Peer libraries (transformer_lens, nnsight) and neuronmap are optional: a variant whose library
is missing is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

N_LAYER = 12
WORKLOADS: dict[str, tuple[int, int]] = {"8x128": (8, 128), "1x1024": (1, 1024)}
REFERENCE = "hf-sdpa"
RESID_NAMES = [f"blocks.{i}.hook_resid_post" for i in range(N_LAYER)]

# A runner takes token ids and returns (model output, captured activations or None).
Runner = Callable[[torch.Tensor], tuple[Any, Any]]


class Skip(Exception):
    """Raised by a variant's setup when its library is unavailable."""


def build_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=N_LAYER,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=1024,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).eval()


class Wrappers:
    """Builds each library's wrapper once, each around its own copy of the base model."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self._built: dict[str, Any] = {}

    def get(self, key: str, build: Callable[[torch.nn.Module], Any]) -> Any:
        if key not in self._built:
            self._built[key] = build(copy.deepcopy(self.base))
        return self._built[key]


# ---------------------------------------------------------------------------- variants


def _hf_sdpa(w: Wrappers) -> Runner:
    model = w.base
    return lambda t: (model(t, use_cache=False).logits, None)


def _hf_eager(w: Wrappers) -> Runner:
    def build(m: torch.nn.Module) -> torch.nn.Module:
        m.set_attn_implementation("eager")
        return m

    model = w.get("hf-eager", build)
    return lambda t: (model(t, use_cache=False).logits, None)


def _torch_hooks(w: Wrappers) -> Runner:
    model = w.base
    blocks = model.transformer.h

    def run(t: torch.Tensor) -> tuple[Any, Any]:
        captured: dict[str, torch.Tensor] = {}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_mod: Any, _inp: Any, out: Any) -> None:
                captured[name] = out[0] if isinstance(out, tuple) else out

            return hook

        handles = [b.register_forward_hook(make_hook(n)) for b, n in zip(blocks, RESID_NAMES)]
        try:
            logits = model(t, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, captured

    return run


def _neuronmap(w: Wrappers) -> Any:
    try:
        import neuronmap as nm

        load = nm.load
    except Exception as exc:  # ImportError, or a half-written package
        raise Skip(f"neuronmap not importable, skipped ({type(exc).__name__}: {exc})") from exc
    return w.get("neuronmap", load)


def _nm_capture(capture: str) -> Callable[[Wrappers], Runner]:
    def build(w: Wrappers) -> Runner:
        model = _neuronmap(w)

        def run(t: torch.Tensor) -> tuple[Any, Any]:
            trace = model.run(t, capture=capture)
            return trace, trace

        return run

    return build


_nm_resid = _nm_capture("blocks.*.hook_resid_post")
_nm_all = _nm_capture("*")


def _bridge(w: Wrappers) -> Any:
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError as exc:
        raise Skip(f"transformer_lens 4.x not installed, skipped ({exc})") from exc

    # boot_transformers(name, hf_model=...) still fetches a tokenizer from the hub, so wrap the
    # in-memory model directly. The bridge replaces submodules in place: it gets its own copy.
    def build(m: torch.nn.Module) -> Any:
        return build_bridge_from_module(m, "GPT2LMHeadModel", hf_config=m.config)

    return w.get("tl-bridge", build)


def _tl_forward(w: Wrappers) -> Runner:
    bridge = _bridge(w)
    return lambda t: (bridge(t, use_cache=False), None)


def _tl_resid(w: Wrappers) -> Runner:
    bridge = _bridge(w)
    return lambda t: bridge.run_with_cache(t, names_filter=RESID_NAMES, use_cache=False)


def _tl_all(w: Wrappers) -> Runner:
    bridge = _bridge(w)
    return lambda t: bridge.run_with_cache(t, use_cache=False)


def _nnsight_resid(w: Wrappers) -> Runner:
    try:
        from nnsight import NNsight
    except ImportError as exc:
        raise Skip(f"nnsight not installed, skipped ({exc})") from exc
    model = w.get("nnsight", NNsight)

    def run(t: torch.Tensor) -> tuple[Any, Any]:
        # nnsight re-executes this block's source; the list must exist before the trace
        # (a list comprehension assigned inside it is not written back to this frame).
        saved: list[Any] = []
        with model.trace(t, use_cache=False):
            for i in range(N_LAYER):
                saved.append(model.transformer.h[i].output.save())
        return None, saved

    return run


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    setup: Callable[[Wrappers], Runner]


VARIANTS: list[Variant] = [
    Variant("hf-sdpa", "HF forward, SDPA (reference)", _hf_sdpa),
    Variant("hf-eager", "HF forward, eager", _hf_eager),
    Variant("torch-hooks", "torch forward hooks, 12 block outputs", _torch_hooks),
    Variant("nm-resid", "neuronmap capture blocks.*.hook_resid_post", _nm_resid),
    Variant("nm-all", 'neuronmap capture "*"', _nm_all),
    Variant("tl-forward", "TL TransformerBridge forward (no cache)", _tl_forward),
    Variant("tl-resid", "TL run_with_cache, resid_post filter", _tl_resid),
    Variant("tl-all", "TL run_with_cache, full cache", _tl_all),
    Variant("nnsight-resid", "nnsight trace, 12 block outputs .save()", _nnsight_resid),
]
VARIANTS_BY_KEY = {v.key: v for v in VARIANTS}


# ---------------------------------------------------------------------------- measuring


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield tensors in a capture container (dict, ActivationCache, trace, list, ...)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, Mapping) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__")):
        for key in list(obj.keys()):
            yield from iter_tensors(obj[key])
    elif hasattr(obj, "value"):  # e.g. an unwrapped proxy holding a tensor
        yield from iter_tensors(obj.value)


def captured_bytes(captured: Any) -> dict[str, int]:
    tensors = list(iter_tensors(captured))
    nominal = sum(t.numel() * t.element_size() for t in tensors)
    storages: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return {"n": len(tensors), "bytes": nominal, "unique_bytes": sum(storages.values())}


def make_tokens(workload: str) -> torch.Tensor:
    batch, seq = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, 50257, (batch, seq), generator=gen)


def time_workload(
    runners: dict[str, Runner], tokens: torch.Tensor, rounds: int, warmup: int
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, dict[str, int]]]:
    """Warm up (dropping variants that fail), then time round-robin with a rotating start."""
    sizes: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        for name in list(runners):
            try:
                out, captured = runners[name](tokens)
            except Exception as exc:  # a broken variant must not end the run
                print(f"[{name}] failed, dropped: {type(exc).__name__}: {exc}")
                continue
            sizes[name] = captured_bytes(captured)
            del out, captured
        names = list(sizes)
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(warmup - 1):  # the pass above was the first warm-up round
            for name in names:
                runners[name](tokens)
        for r in range(rounds):
            start = r % len(names)
            for name in names[start:] + names[:start]:
                gc.collect()
                w0, c0 = time.perf_counter(), time.process_time()
                out = runners[name](tokens)
                c1, w1 = time.process_time(), time.perf_counter()
                del out
                samples[name].append((w1 - w0, c1 - c0))
    return samples, sizes


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(key: str, workloads: list[str], threads: int | None) -> None:
    """Entry point of the per-variant child process: prints one JSON line per workload."""
    if threads:
        torch.set_num_threads(threads)
    try:
        run = VARIANTS_BY_KEY[key].setup(Wrappers(build_model()))
    except Exception as exc:
        print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    for workload in workloads:
        tokens = make_tokens(workload)
        with torch.inference_mode():
            cold_kb = _proc_status_kb("VmRSS")
            warm = run(tokens)
            del warm
            gc.collect()
            retained_kb = _proc_status_kb("VmRSS") - cold_kb
            exact = _reset_peak_rss()
            before_kb = (
                _proc_status_kb("VmRSS")
                if exact
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            )
            held = run(tokens)
            peak_kb = (
                _proc_status_kb("VmHWM")
                if exact
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            )
            del held
        result = {
            "workload": workload,
            "peak_rise_bytes": (peak_kb - before_kb) * 1024,
            "retained_bytes": retained_kb * 1024,
            "method": "VmHWM-reset" if exact else "ru_maxrss (lower bound)",
        }
        print(json.dumps(result), flush=True)
        gc.collect()


def measure_memory(
    key: str, workloads: list[str], threads: int | None
) -> dict[str, dict[str, Any]] | str:
    """One fresh child per workload, so state a library keeps from one workload's calls
    cannot lower the next workload's numbers."""
    env = dict(os.environ)
    # Fixed threshold: every allocation >= 64 KiB is its own mmap and is unmapped on free, so
    # RSS tracks live tensors instead of glibc's growing heap.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    results: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_memory-child",
            key,
            "--workloads",
            workload,
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if records and "skip" in records[0]:
            return records[0]["skip"]
        if not records:
            tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
            return f"memory child failed on {workload} (rc={proc.returncode}): {tail[0]}"
        results[workload] = records[0]
    return results


# ---------------------------------------------------------------------------- reporting


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"


def summarise(
    samples: dict[str, list[tuple[float, float]]],
) -> dict[str, dict[str, float]]:
    ref_wall = [w for w, _ in samples[REFERENCE]] if REFERENCE in samples else None
    eager_wall = [w for w, _ in samples["hf-eager"]] if "hf-eager" in samples else None
    out: dict[str, dict[str, float]] = {}
    for name, rows in samples.items():
        walls = [w for w, _ in rows]
        cpus = [c for _, c in rows]
        stats = {
            "wall_s": statistics.median(walls),
            "min_wall_s": min(walls),
            "cpu_s": statistics.median(cpus),
        }
        if ref_wall:
            stats["ratio"] = statistics.median(w / r for w, r in zip(walls, ref_wall))
        if eager_wall:
            stats["ratio_eager"] = statistics.median(w / e for w, e in zip(walls, eager_wall))
        out[name] = stats
    return out


def print_table(results: dict[str, Any]) -> None:
    print()
    print(
        "| workload | variant | wall ms | min wall ms | CPU ms | x SDPA (paired) | x eager (paired) "
        "| peak rise MB | rise over SDPA MB | retained MB | captured MB | tensors |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload, per_variant in results["timings"].items():
        for key, stats in per_variant.items():
            size = results["captured"][workload].get(key, {})
            mem = results["memory"].get(key)
            mem_w = mem.get(workload, {}) if isinstance(mem, dict) else {}
            rise, kept = mem_w.get("peak_rise_bytes"), mem_w.get("retained_bytes")
            cap = "-" if not size.get("n") else _mb(size["bytes"])
            if size.get("n") and size["unique_bytes"] != size["bytes"]:
                cap += f" ({_mb(size['unique_bytes'])} unique)"
            ratio = "n/a" if stats.get("ratio") is None else f"{stats['ratio']:.2f}"
            ratio_eager = "n/a" if stats.get("ratio_eager") is None else f"{stats['ratio_eager']:.2f}"
            reference = results["memory"].get(REFERENCE)
            ref_rise = reference.get(workload, {}).get("peak_rise_bytes") if isinstance(reference, dict) else None
            extra = None if rise is None or ref_rise is None else rise - ref_rise
            print(
                f"| {workload} | {VARIANTS_BY_KEY[key].label} | {stats['wall_s'] * 1e3:,.0f} "
                f"| {stats['min_wall_s'] * 1e3:,.0f} | {stats['cpu_s'] * 1e3:,.0f} | {ratio} | {ratio_eager} "
                f"| {_mb(rise)} | {_mb(extra)} | {_mb(kept)} | {cap} | {size.get('n') or '-'} |"
            )
    print()
    print("wall/CPU: medians over rounds; x SDPA: median of per-round wall-time ratios to the")
    print("reference. Peak rise includes the returned logits (batch*seq*50257*4 bytes) that every")
    print("variant holds. Retained: RSS still held after the first call's results are freed")
    print("(state a library keeps between calls, plus one-time allocations); it sits in the")
    print("baseline of the peak rise. 'unique' de-duplicates entries that alias one storage.")


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in ("torch", "transformers", "transformer-lens", "nnsight", "neuronmap"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "-"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first, at least 1 (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS_BY_KEY),
        help="comma-separated subset of: " + ", ".join(VARIANTS_BY_KEY),
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help="comma-separated subset of: " + ", ".join(WORKLOADS),
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-RSS child processes")
    parser.add_argument("--json", metavar="PATH", help="also write raw results as JSON")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    workloads = [w for w in args.workloads.split(",") if w]
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"unknown workloads: {sorted(unknown)}")
    if args.memory_child:
        memory_child(args.memory_child, workloads, args.threads)
        return 0
    keys = [k for k in args.variants.split(",") if k]
    if unknown := set(keys) - set(VARIANTS_BY_KEY):
        parser.error(f"unknown variants: {sorted(unknown)}")
    if REFERENCE not in keys:
        keys.insert(0, REFERENCE)
    rounds, warmup = (2, 1) if args.quick else (args.rounds, args.warmup)
    if args.threads:
        torch.set_num_threads(args.threads)

    versions = _versions()
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"torch threads: {torch.get_num_threads()}, rounds: {rounds}, warm-up: {warmup}")

    wrappers = Wrappers(build_model())
    runners: dict[str, Runner] = {}
    for key in keys:
        try:
            runners[key] = VARIANTS_BY_KEY[key].setup(wrappers)
        except Skip as exc:
            print(f"[{key}] {exc}")
        except Exception as exc:
            print(f"[{key}] setup failed, skipped: {type(exc).__name__}: {exc}")

    results: dict[str, Any] = {
        "versions": versions,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "timings": {},
        "captured": {},
        "memory": {},
        "raw": {},
    }
    for workload in workloads:
        print(f"timing {workload} ...", flush=True)
        samples, sizes = time_workload(runners, make_tokens(workload), rounds, warmup)
        results["timings"][workload] = summarise(samples)
        results["captured"][workload] = sizes
        results["raw"][workload] = samples

    # Free the timing process's copies before spawning memory children.
    del runners, wrappers
    gc.collect()
    if not args.no_memory:
        for key in results["timings"][workloads[0]]:
            print(f"peak memory {key} ...", flush=True)
            mem = measure_memory(key, workloads, args.threads)
            if isinstance(mem, str):
                print(f"[{key}] {mem}")
            results["memory"][key] = mem
        methods = {
            r["method"]
            for m in results["memory"].values()
            if isinstance(m, dict)
            for r in m.values()
        }
        print("peak-memory method:", ", ".join(sorted(methods)) or "-")

    print_table(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
