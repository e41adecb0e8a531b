"""SAELens's activation cache (`CacheActivationsRunner`) on the store benchmark's model and data: the reference that
`benchmarks/store.py` is measured against. Runs in its own environment, offline:

    python3 -m venv .saelens-venv
    .saelens-venv/bin/pip install -c constraints.txt sae-lens -e .
    .saelens-venv/bin/python benchmarks/store_saelens.py --tokens 200000 --context 128 --batch 16 --out-dir /tmp/xyz

Model: a randomly initialised GPT-2-small-sized `GPT2LMHeadModel` (12 layers, d_model 768, 12 heads, vocab 50257,
`torch.manual_seed(0)`), saved with `save_pretrained` next to a locally built word-level tokenizer of the same vocab
size (no hub); the weights are `benchmarks/store.py`'s `build()`. Data: `store.py`'s `data()` (random token ids,
seed 1, rows of `--context`) as a pre-tokenized `datasets.Dataset`, rounded down to whole batches (SAELens only
caches whole batches and whole buffers).

SAELens builds its model by name through `HookedTransformer.from_pretrained_no_processing`, which in
TransformerLens 3.x only accepts official hub names, so the runner is handed a `HookedTransformer` built offline the
same way (the same config conversion, the same GPT-2 weight conversion, no weight processing) by replacing the
`load_model` its module calls; everything the runner does after that is SAELens's own. It caches one hook per run
(`hook_name` is a single string), at `blocks.{--layer}.hook_resid_post`, in `--dtype` (float16 by default).

Every measurement runs in a child process of its own (one at a time), so each one's resident-set high-water mark
(`VmHWM`, reset just before the timed section) is its own. Measured, per round (`--repeats` rounds, interleaved):
  forward          the TransformerLens model's forward (logits) over the same batches, no hooks, under no_grad;
  forward_to_layer the same forward stopped after block `--layer` (`stop_at_layer`), which is all the caching
                   run computes (it never reaches ln_final or the unembedding);
  cache            `CacheActivationsRunner(...).run()`: forwards, HF-datasets Arrow shards, consolidation.
The last line on stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------------------------------
# memory and disk


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else -1


def reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_now() -> int:
    return _status_kb("VmRSS") * 1024


def rss_peak() -> int:
    return _status_kb("VmHWM") * 1024


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def disk_usage(path: str) -> dict:
    files, size, allocated = {}, 0, 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            st = os.stat(full)
            files[os.path.relpath(full, path)] = st.st_size
            size += st.st_size
            allocated += st.st_blocks * 512
    return {"bytes": size, "allocated_bytes": allocated, "files": files}


# ---------------------------------------------------------------------------------------------------------------------
# model and data


def paths(out_dir: str) -> dict:
    return {
        "model": os.path.join(out_dir, "model"),
        "tokens": os.path.join(out_dir, "tokens.pt"),
    }


def prepare(args) -> None:
    """Build and save the seeded random GPT-2-small-sized model, its tokenizer and the token ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    p = paths(args.out_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.d_model,
        n_head=args.n_head,
        vocab_size=args.vocab,
        n_positions=1024,
        n_ctx=1024,  # the hub's gpt2 config.json carries it; TransformerLens 3.x reads it
        bos_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 1,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(p["model"])
    # GPT-2's own BPE needs the hub; a word-level tokenizer of the same size ("t0" ... plus <|endoftext|> last, as in
    # GPT-2) gives TransformerLens and SAELens a real tokenizer with the right vocab and BOS id. The data is token ids.
    vocab = {f"t{i}": i for i in range(args.vocab - 1)}
    vocab["<|endoftext|>"] = args.vocab - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    ).save_pretrained(p["model"])

    generator = torch.Generator().manual_seed(args.data_seed)
    rows = args.tokens // args.context
    tokens = torch.randint(0, args.vocab, (rows, args.context), generator=generator, dtype=torch.long)
    torch.save(tokens, p["tokens"])


def load_tl_model(model_dir: str):
    """`HookedTransformer.from_pretrained_no_processing` for a local directory (TransformerLens 3.x refuses
    non-hub names there): the same config conversion, GPT-2 weight conversion and unprocessed state-dict load."""
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = loading.get_pretrained_model_config(
        model_dir, hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu", dtype=torch.float32
    )
    state_dict = loading.get_pretrained_state_dict(model_dir, cfg, hf_model, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del hf_model, state_dict
    return model.eval()


def plan(args) -> dict:
    """Whole batches, and whole SAELens buffers (`buffer_size_gb`, SAELens's default 2 GB, caps a buffer)."""
    import torch

    batch_tokens = args.batch * args.context
    n_batches = args.tokens // batch_tokens
    if n_batches < 1:
        sys.exit(f"--tokens {args.tokens} is less than one batch ({args.batch} x {args.context})")
    bytes_per_token = args.d_model * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    per_buffer = max(1, min(n_batches, int(args.buffer_gb * 1e9) // bytes_per_token // batch_tokens))
    n_batches -= n_batches % per_buffer  # SAELens fills every buffer; a partial last one would wrap the data
    return {
        "batch_tokens": batch_tokens,
        "n_batches": n_batches,
        "tokens": n_batches * batch_tokens,
        "batches_per_buffer": per_buffer,
        "buffer_tokens": per_buffer * batch_tokens,
        "bytes_per_token": bytes_per_token,
    }


def load_batches(args, pl):
    import torch

    tokens = torch.load(paths(args.out_dir)["tokens"], weights_only=True)
    rows = tokens[: pl["n_batches"] * args.batch]
    return rows, list(rows.split(args.batch))


# ---------------------------------------------------------------------------------------------------------------------
# the measured phases (each in its own child process)


def phase_forward(args, to_layer: bool) -> dict:
    import torch

    pl = plan(args)
    model = load_tl_model(paths(args.out_dir)["model"])
    _rows, batches = load_batches(args, pl)
    kwargs = {"stop_at_layer": args.layer + 1} if to_layer else {"return_type": "logits"}
    with torch.no_grad():
        model(batches[0], **kwargs)  # warm-up, untimed
        rss_before = rss_now()
        reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            out = model(batch, **kwargs)
            del out
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens": pl["tokens"],
        "tokens_per_s": pl["tokens"] / wall,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": rss_peak(),
        "maxrss_bytes": maxrss_bytes(),
    }


def phase_cache(args, round_: int) -> dict:
    import datasets
    import sae_lens.cache_activations_runner as car
    import torch
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    pl = plan(args)
    model_dir = paths(args.out_dir)["model"]
    model = load_tl_model(model_dir)
    rows, batches = load_batches(args, pl)
    with torch.no_grad():
        model(batches[0], return_type="logits")  # warm-up, untimed, as for the forwards

    def load_model(model_class_name, model_name, device=None, model_from_pretrained_kwargs=None, hook_names=None):
        assert model_class_name == "HookedTransformer" and model_name == model_dir, (model_class_name, model_name)
        return model

    car.load_model = load_model  # SAELens's runner asks for the model by hub name; hand it the offline-built one

    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    cache_dir = os.path.join(args.out_dir, f"cache_round{round_}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local/random-token-ids",  # only names things: the dataset itself is passed in below
        model_name=model_dir,
        model_class_name="HookedTransformer",
        model_batch_size=args.batch,
        hook_name=hook_name,
        d_in=args.d_model,
        training_tokens=pl["tokens"],
        context_size=args.context,
        new_cached_activations_path=cache_dir,
        shuffle=False,  # store in order, like benchmarks/store.py (shuffling is an index mapping on load anyway)
        dtype=args.dtype,
        device="cpu",
        # exactly `buffer_tokens` per buffer (half a token's bytes of slack against float rounding)
        buffer_size_gb=(pl["buffer_tokens"] * pl["bytes_per_token"] + pl["bytes_per_token"] // 2) / 1e9,
        prepend_bos=False,  # pre-tokenized rows are used as they are either way
        streaming=False,
    )
    assert cfg.n_tokens_in_buffer == pl["buffer_tokens"], (cfg.n_tokens_in_buffer, pl)
    assert cfg.n_buffers * cfg.n_tokens_in_buffer == pl["tokens"], (cfg.n_buffers, cfg.n_tokens_in_buffer, pl)

    rss_before = rss_now()
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    runner = CacheActivationsRunner(cfg, override_dataset=dataset)
    init_wall = time.perf_counter() - wall
    stored = runner.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss_peak()
    disk = disk_usage(cache_dir)

    # check: what is on disk is the model's activations and tokens, in order
    features = stored.features
    first = {name: torch.from_numpy(value) for name, value in stored.with_format("numpy")[: args.batch].items()}
    with torch.no_grad():
        _logits, cache = model.run_with_cache(batches[0], names_filter=[hook_name], stop_at_layer=args.layer + 1)
    reference = cache[hook_name]
    check = {
        "rows": len(stored),
        "rows_expected": pl["n_batches"] * args.batch,
        "stored_arrow_type": str(stored.data.column(hook_name).type.storage_type),  # datasets reads it back upcast
        "stored_shape_per_row": list(first[hook_name].shape[1:]),
        "token_ids_equal": bool(torch.equal(first["token_ids"].long(), batches[0])),
        "max_abs_diff_vs_fp32": float((first[hook_name].float() - reference).abs().max()),
        "max_abs_activation": float(reference.abs().max()),
    }
    if not args.keep:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "init_s": init_wall,
        "run_s": wall - init_wall,
        "tokens": pl["tokens"],
        "tokens_per_s": pl["tokens"] / wall,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "maxrss_bytes": maxrss_bytes(),
        "disk_bytes": disk["bytes"],
        "disk_allocated_bytes": disk["allocated_bytes"],
        "disk_files": disk["files"],
        "raw_activation_bytes": pl["tokens"] * pl["bytes_per_token"],
        "features": {name: repr(feature) for name, feature in features.items()},
        "n_buffers": cfg.n_buffers,
        "buffer_tokens": cfg.n_tokens_in_buffer,
        "check": check,
    }


# ---------------------------------------------------------------------------------------------------------------------
# driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="total tokens (rounded down to whole batches)")
    ap.add_argument("--context", type=int, default=128, help="tokens per row")
    ap.add_argument("--batch", type=int, default=16, help="rows per forward")
    ap.add_argument("--out-dir", default=None, help="model, tokens and caches go here (default: a new temp dir)")
    ap.add_argument("--layer", type=int, default=None, help="cache blocks.LAYER.hook_resid_post (default: last)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="stored dtype")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every phase")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--buffer-gb", type=float, default=2.0, help="SAELens buffer_size_gb cap (its default: 2)")
    ap.add_argument("--no-forward-to-layer", action="store_true", help="skip the truncated-forward phase")
    ap.add_argument("--keep", action="store_true", help="keep the cache directories")
    ap.add_argument("--data-seed", type=int, default=1, help="seed of the token ids (store.py's data() default)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.layer is None:
        args.layer = args.n_layer - 1
    return args


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0]}
    for dist in ("sae-lens", "transformer-lens", "torch", "transformers", "datasets", "pyarrow"):
        try:
            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = None
    return out


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.phase == "forward":
        result = phase_forward(args, to_layer=False)
    elif args.phase == "forward_to_layer":
        result = phase_forward(args, to_layer=True)
    elif args.phase == "cache":
        result = phase_cache(args, args.round)
    else:
        sys.exit(f"unknown phase {args.phase}")
    result["loadavg_1min_after"] = os.getloadavg()[0]  # other work on the machine shows up here
    print(json.dumps(result), flush=True)


def run_phase(args, phase: str, round_: int) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--out-dir", args.out_dir]
    argv += ["--phase", phase, "--round", str(round_)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        sys.exit(f"phase {phase} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.phase:
        child(args)
        return
    if args.out_dir is None:
        args.out_dir = tempfile.mkdtemp(prefix="store_saelens_")
    os.makedirs(args.out_dir, exist_ok=True)
    pl = plan(args)
    start = time.perf_counter()
    print(f"preparing model and data in {args.out_dir}", file=sys.stderr, flush=True)
    prepare(args)

    phases = ["forward", "cache"] + ([] if args.no_forward_to_layer else ["forward_to_layer"])
    runs: dict[str, list[dict]] = {name: [] for name in phases}
    for round_ in range(args.repeats):
        order = phases[round_ % len(phases):] + phases[: round_ % len(phases)]
        for phase in order:
            result = run_phase(args, phase, round_)
            runs[phase].append(result)
            print(f"round {round_ + 1}/{args.repeats} {phase}: {result['wall_s']:.1f} s, "
                  f"{result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"load average {result['loadavg_1min_after']:.2f}",
                  file=sys.stderr, flush=True)

    def summary(name: str) -> dict | None:
        if name not in runs:
            return None
        rs = runs[name]
        walls = [r["wall_s"] for r in rs]
        out = {
            "wall_s": statistics.median(walls),
            "wall_s_all": walls,
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "tokens_per_s": pl["tokens"] / statistics.median(walls),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "rss_before_bytes": statistics.median(r["rss_before_bytes"] for r in rs),
            "maxrss_bytes": max(r["maxrss_bytes"] for r in rs),
            "loadavg_1min_after": [r["loadavg_1min_after"] for r in rs],
        }
        if name == "cache":
            last = rs[-1]
            out.update({
                "init_s": statistics.median(r["init_s"] for r in rs),
                "run_s": statistics.median(r["run_s"] for r in rs),
                "disk_bytes": last["disk_bytes"],
                "disk_allocated_bytes": last["disk_allocated_bytes"],
                "raw_activation_bytes": last["raw_activation_bytes"],
                "disk_files": last["disk_files"],
                "features": last["features"],
                "n_buffers": last["n_buffers"],
                "buffer_tokens": last["buffer_tokens"],
                "check": last["check"],
            })
        return out

    forward, cache, to_layer = summary("forward"), summary("cache"), summary("forward_to_layer")
    report = {
        "benchmark": "store_saelens",
        "tool": "sae_lens.CacheActivationsRunner",
        "versions": versions(),
        "model": f"GPT2LMHeadModel random init (seed 0): {args.n_layer} layers, d_model {args.d_model}, "
        f"{args.n_head} heads, vocab {args.vocab}, float32, via TransformerLens HookedTransformer",
        "threads": args.threads,
        "tokens_requested": args.tokens,
        "tokens": pl["tokens"],
        "context": args.context,
        "batch": args.batch,
        "n_batches": pl["n_batches"],
        "hook_names": [f"blocks.{args.layer}.hook_resid_post"],
        "hooks_per_run": "one (CacheActivationsRunnerConfig.hook_name is a single hook)",
        "stored_dtype": args.dtype,
        "repeats": args.repeats,
        "forward": forward,
        "forward_to_layer": to_layer,
        "cache": cache,
        # tokens/s of the caching run over tokens/s of the bare forward (1.0 = free, below 1 = slower)
        "ratio": cache["tokens_per_s"] / forward["tokens_per_s"],
        "ratio_vs_forward_to_layer": cache["tokens_per_s"] / to_layer["tokens_per_s"] if to_layer else None,
        "total_s": time.perf_counter() - start,
        "out_dir": args.out_dir,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
