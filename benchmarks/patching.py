"""CPU benchmark: activation-patching sweeps (TransformerLens, a hand-written hook loop, NeuronMap), in bare forwards.

TransformerLens is not a dependency of neuronmap; it lives in a separate virtual environment. From the
repository root::

    python3 -m venv .bench-venv && . .bench-venv/bin/activate
    pip install -c constraints.txt torch==2.13.0 "transformer_lens==3.9.0"   # 4.x removed HookedTransformer
    pip install -c constraints.txt -e .
    python benchmarks/patching.py              # 3 rounds + peak memory: about 35 minutes on 2 busy cores
    python benchmarks/patching.py --rounds 5
    python benchmarks/patching.py --quick      # 2-layer smoke configuration, no peak memory: under a minute

Without TransformerLens installed (e.g. in the dev venv) the TransformerLens rows are skipped; without
``neuronmap.patch`` the NeuronMap rows are. TransformerLens 3.9 works with the same transformers (5.x) as
neuronmap, so all three methods run in one process, each timed against the same bare forward.

Model: a randomly initialised GPT-2-small-sized ``GPT2LMHeadModel`` (12 layers, d_model 768, 12 heads, vocab
50257, n_positions 1024, seed 0, float32, eval mode, SDPA attention unless ``--attn eager``). Nothing is
downloaded. Inputs: 8 prompts x 20 random tokens; the corrupted prompts differ from the clean ones at 3 random
positions each (not the last); per-prompt random correct and wrong answer tokens. Metric: the logit difference
(correct - wrong) at the last position, averaged over prompts. Everything runs under ``torch.no_grad()`` (as TL's
tutorials do with ``torch.set_grad_enabled(False)``).

Sweeps (denoising: clean activations into the corrupted run):

* ``resid_pre``  ``blocks.{L}.hook_resid_pre`` by layer x position (12 x 20 = 240 cells)
* ``z``          ``blocks.{L}.attn.hook_z`` by layer x head, all positions (12 x 12 = 144 cells)

Methods (each timed as a whole workflow, from the clean tokens to the table of metric values):

* ``transformerlens``  ``HookedTransformer`` holding the same weights (TL's own ``convert_gpt2_weights``, no
                       layer-norm folding, centering or value-bias folding, so activations are comparable), then
                       ``run_with_cache(clean)`` + ``patching.get_act_patch_resid_pre`` /
                       ``get_act_patch_attn_head_out_all_pos``. Forwards counted by wrapping ``model.forward``.
* ``hook-loop``        plain torch hooks on the HF modules: one clean forward capturing the inputs of every block
                       (resid_pre) or of every ``attn.c_proj`` (z, heads concatenated), then one corrupted forward
                       per cell with a forward pre-hook replacing position p of block L's input, or head h's slice
                       of ``attn.c_proj``'s input. The reference the other results are compared with.
* ``neuronmap``        ``nm.patch(nm.load(hf_model), clean, corrupt, nm.patching.logit_diff(...), what=..., by=...)``;
                       its forwards are the clean run, the corrupted run (cached and captured at once) plus ``result.forwards`` stacked
                       groups.

Timing: after a warm-up (one cell of each sweep), every round runs all (method, sweep) variants in a rotating order, each preceded by
three bare forwards of the corrupted batch (``module(tokens, use_cache=False)``); a round's bare-forward time is
the median of its bare forwards. Reported: median wall and CPU time (``time.process_time``) over rounds, the
median of the per-round ratios to the bare forward ("x bare fwd", wall and CPU) and to TransformerLens's run of
the same sweep, and the largest |raw metric difference| from the hook loop. Peak memory: each (method, sweep) runs
once in a fresh subprocess; after setup (model, inputs, TL conversion, one bare forward) the kernel's resident
high-water mark is reset (``/proc/self/clear_refs``), and the growth of VmHWM over VmRSS during the sweep is
reported (Linux only; ``--no-memory`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens shows a progress bar per sweep
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402

import neuronmap as nm  # noqa: E402
from harness import interleaved_rounds, resident  # noqa: E402  (benchmarks/harness.py, beside this script)

SWEEPS = ("resid_pre", "z")
METHODS = ("transformerlens", "hook-loop", "neuronmap")
FULL = dict(n_layer=12, n_embd=768, n_head=12, prompts=8, length=20, corrupted=3)
QUICK = dict(n_layer=2, n_embd=256, n_head=4, prompts=4, length=8, corrupted=2)
VOCAB = 50257


@dataclass
class Setup:
    module: torch.nn.Module
    clean: torch.Tensor
    corrupt: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    n_layer: int
    n_head: int


def build(shape: dict, attn: str) -> Setup:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], vocab_size=VOCAB, n_positions=1024,
        attn_implementation=attn,
    )
    module = GPT2LMHeadModel(config).float().eval()
    generator = torch.Generator().manual_seed(0)
    n, length = shape["prompts"], shape["length"]
    clean = torch.randint(0, VOCAB, (n, length), generator=generator)
    corrupt = clean.clone()
    for i in range(n):
        where = torch.randperm(length - 1, generator=generator)[: shape["corrupted"]]
        corrupt[i, where] = torch.randint(0, VOCAB, (len(where),), generator=generator)
    answers = torch.randint(0, VOCAB, (2, n), generator=generator)
    return Setup(module, clean, corrupt, answers[0], answers[1], shape["n_layer"], shape["n_head"])


def logit_diff(setup: Setup) -> Callable[[torch.Tensor], torch.Tensor]:
    """The metric as a function of logits [prompt, pos, vocab]: mean over prompts of correct - wrong at the end."""
    prompts = torch.arange(len(setup.correct))

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return (last[prompts, setup.correct] - last[prompts, setup.wrong]).mean()

    return metric


def bare_forward(setup: Setup) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return setup.module(setup.corrupt, use_cache=False).logits

    return run


# ---------------------------------------------------------------------------------------------- TransformerLens


def transformer_lens_version() -> str | None:
    try:
        from importlib.metadata import version

        import transformer_lens  # noqa: F401

        return version("transformer_lens")
    except ImportError:
        return None


def hooked_transformer(module: torch.nn.Module):
    """A HookedTransformer with `module`'s weights, through TransformerLens's own GPT-2 conversion, built offline.

    `HookedTransformer.from_pretrained("gpt2", hf_model=...)` still fetches the hub config, so the config is the
    one TL's `convert_hf_model_config` derives for a `GPT2LMHeadModel`, filled from the module's config.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = module.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd, n_layers=c.n_layer,
        n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn=c.activation_function,
        use_attn_scale=c.scale_attn_weights, use_local_attn=False,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, normalization_type="LN",
        original_architecture="GPT2LMHeadModel", tokenizer_name=None, init_weights=False, device="cpu",
        dtype=torch.float32,
    )
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        convert_gpt2_weights(module, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.eval()
    calls = [0]
    forward = model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    model.forward_calls = calls
    return model


def tl_variant(setup: Setup, model, sweep: str) -> Callable[[], tuple[torch.Tensor, int]]:
    from transformer_lens import patching

    patcher = patching.get_act_patch_resid_pre if sweep == "resid_pre" else patching.get_act_patch_attn_head_out_all_pos
    metric = logit_diff(setup)

    def run(warm: bool = False):
        before = model.forward_calls[0]
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(setup.clean)
            if warm:  # one cell only
                import pandas as pd

                cell = pd.DataFrame({"layer": [setup.n_layer - 1], "pos" if sweep == "resid_pre" else "head": [0]})
                values = patcher(model, setup.corrupt, clean_cache, metric, index_axis_names=None, index_df=cell)
            else:
                values = patcher(model, setup.corrupt, clean_cache, metric)
        return values.detach().cpu(), model.forward_calls[0] - before

    return run


# ---------------------------------------------------------------------------------------------- plain hook loop


def loop_variant(setup: Setup, sweep: str) -> Callable[[], tuple[torch.Tensor, int]]:
    module, metric = setup.module, logit_diff(setup)
    blocks = list(module.transformer.h)
    targets = blocks if sweep == "resid_pre" else [block.attn.c_proj for block in blocks]
    d_head = module.config.n_embd // setup.n_head

    def first_input(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def replaced(args, kwargs, value):
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    def run(warm: bool = False):
        forwards = 0
        captured: list[torch.Tensor] = [None] * len(targets)  # type: ignore[list-item]

        def capture(i):
            def hook(mod, args, kwargs):
                captured[i] = first_input(args, kwargs).detach().clone()

            return hook

        handles = [t.register_forward_pre_hook(capture(i), with_kwargs=True) for i, t in enumerate(targets)]
        try:
            with torch.no_grad():
                module(setup.clean, use_cache=False)
                forwards += 1
        finally:
            for handle in handles:
                handle.remove()
        n_cells = setup.clean.shape[1] if sweep == "resid_pre" else setup.n_head
        values = torch.empty(len(targets), n_cells)
        for layer, target in enumerate(targets):
            for cell in range(n_cells):
                if warm and (layer, cell) != (0, 0):  # one cell only
                    continue
                part = (slice(None), cell) if sweep == "resid_pre" else (slice(None), slice(None), slice(cell * d_head, (cell + 1) * d_head))

                def patch(mod, args, kwargs, part=part, source=captured[layer]):
                    value = first_input(args, kwargs).clone()
                    value[part] = source[part]
                    return replaced(args, kwargs, value)

                handle = target.register_forward_pre_hook(patch, with_kwargs=True)
                try:
                    with torch.no_grad():
                        values[layer, cell] = metric(module(setup.corrupt, use_cache=False).logits)
                        forwards += 1
                finally:
                    handle.remove()
        return values, forwards

    return run


# ---------------------------------------------------------------------------------------------- NeuronMap


def nm_available() -> bool:
    return callable(getattr(nm, "patch", None)) and hasattr(getattr(nm, "patching", None), "logit_diff")


def nm_variant(setup: Setup, sweep: str) -> Callable[[], tuple[torch.Tensor, int]]:
    model = nm.load(setup.module)
    metric = nm.patching.logit_diff(setup.correct, setup.wrong)
    what, by = ("resid_pre", "layer_pos") if sweep == "resid_pre" else ("z", "layer_head")

    def run(warm: bool = False):
        only = dict(layers=[setup.n_layer - 1], **({"positions": [0]} if sweep == "resid_pre" else {"heads": [0]})) if warm else {}
        result = nm.patch(model, setup.clean, setup.corrupt, metric, what=what, by=by, progress=False, **only)
        forwards = getattr(result, "forwards", None)
        return result.raw.detach().cpu(), (None if forwards is None else forwards + 2)  # + clean run, corrupted run

    return run


# ---------------------------------------------------------------------------------------------- measuring


def variants(setup: Setup, methods: list[str]) -> dict[tuple[str, str], Callable[[], tuple[torch.Tensor, int]]]:
    found = {}
    tl_model = hooked_transformer(setup.module) if "transformerlens" in methods else None
    for method in methods:
        for sweep in SWEEPS:
            if method == "transformerlens":
                found[method, sweep] = tl_variant(setup, tl_model, sweep)
            elif method == "hook-loop":
                found[method, sweep] = loop_variant(setup, sweep)
            else:
                found[method, sweep] = nm_variant(setup, sweep)
    return found


def measure(setup: Setup, calls: dict, rounds: int, progress: bool) -> dict:
    bare = bare_forward(setup)
    for _ in range(3):
        bare()
    for call in calls.values():  # warm-up: one cell of each sweep
        call(warm=True)
    return interleaved_rounds(bare, calls, rounds, "transformerlens", progress)


# ---------------------------------------------------------------------------------------------- peak memory


def memory_child(shape: dict, attn: str, method: str, sweep: str) -> dict:
    """In a fresh process: set up, reset the resident high-water mark, run one sweep, report the peak's growth."""
    import gc

    setup = build(shape, attn)
    call = bare_forward(setup) if method == "bare-forward" else variants(setup, [method])[method, sweep]
    bare_forward(setup)()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = resident()
    call()
    after = resident()
    return {"growth": after["VmHWM"] - before["VmRSS"], "baseline": before["VmRSS"]}


def peak_memory(shape: dict, attn: str, keys: list[tuple[str, str]], quick: bool) -> dict:
    found = {}
    for method, sweep in [("bare-forward", "-"), *keys]:
        command = [sys.executable, __file__, "--memory-child", method, sweep, "--attn", attn] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  peak memory of {method} {sweep} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        found[method, sweep] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


# ---------------------------------------------------------------------------------------------- report


def report(measured: dict, memory: dict, methods: list[str]) -> list[str]:
    rec, results = measured["rec"], measured["results"]
    lines = [
        f"{'method':16} {'sweep':9} {'forwards':>8} {'wall (s)':>9} {'CPU (s)':>8} {'x bare fwd':>10} {'x bare CPU':>10} "
        f"{'ratio to TL':>11} {'max|diff| vs loop':>17} {'peak RSS +MB':>12}"
    ]
    for sweep in SWEEPS:
        for method in methods:
            key = (method, sweep)
            r = rec[key]
            values, forwards = results[key]
            reference = results.get(("hook-loop", sweep))
            diff = f"{(values - reference[0]).abs().max().item():.2e}" if reference is not None else "n/a"
            to_tl = f"{statistics.median(r['to_ref']):.3f}x" if r["to_ref"] else "n/a"
            lines.append(
                f"{method:16} {sweep:9} {forwards if forwards is not None else '?':>8} {statistics.median(r['wall']):9.2f} "
                f"{statistics.median(r['cpu']):8.2f} {statistics.median(r['x_wall']):9.1f}x {statistics.median(r['x_cpu']):9.1f}x "
                f"{to_tl:>11} {diff:>17} {_mb(memory.get(key)):>12}"
            )
    lines.append(
        f"{'bare HF forward':16} {'-':9} {1:>8} {statistics.median(measured['bare_wall']):9.3f} "
        f"{statistics.median(measured['bare_cpu']):8.3f} {1.0:9.1f}x {1.0:9.1f}x {'':>11} {'':>17} "
        f"{_mb(memory.get(('bare-forward', '-'))):>12}"
    )
    return lines


def _mb(memory: dict | None) -> str:
    return f"{memory['growth'] / 2**20:.0f}" if memory else "n/a"


def summary(setup: Setup, measured: dict) -> list[str]:
    """The metric on the unpatched runs and the range of the reference values: the sweeps measure something."""
    metric = logit_diff(setup)
    with torch.no_grad():
        clean = metric(setup.module(setup.clean, use_cache=False).logits).item()
        corrupt = metric(setup.module(setup.corrupt, use_cache=False).logits).item()
    lines = [f"metric (mean logit difference): clean run {clean:.5f}, corrupted run {corrupt:.5f}"]
    for sweep in SWEEPS:
        values = measured["results"][("hook-loop", sweep)][0]
        lines.append(f"hook-loop {sweep}: raw values from {values.min().item():.5f} to {values.max().item():.5f}")
    return lines


def check(measured: dict, methods: list[str]) -> list[str]:
    """NeuronMap must equal the hook loop within 1e-5, TransformerLens within 1e-4."""
    results, problems = measured["results"], []
    for sweep in SWEEPS:
        reference = results[("hook-loop", sweep)][0]
        for method, tolerance in (("neuronmap", 1e-5), ("transformerlens", 1e-4)):
            if method in methods:
                diff = (results[method, sweep][0] - reference).abs().max().item()
                verdict = "ok" if diff <= tolerance else "MISMATCH"
                problems.append(f"{method} {sweep}: max |raw - loop| = {diff:.2e} (tolerance {tolerance:g}) {verdict}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers x 256 wide, 4 prompts x 8 tokens, no peak memory: a smoke run")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="the HF model's attention implementation")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "SWEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.memory_child:
        print(json.dumps(memory_child(shape, args.attn, *args.memory_child)))
        return 0

    import transformers

    began = time.perf_counter()
    tl_version = transformer_lens_version()
    methods = list(METHODS)
    notes = []
    if tl_version is None:
        methods.remove("transformerlens")
        notes.append("TransformerLens is not installed here: its rows are skipped (see the docstring for the venv).")
    if not nm_available():
        methods.remove("neuronmap")
        notes.append("neuronmap.patch does not exist yet: the NeuronMap rows are skipped.")
    setup = build(shape, args.attn)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, transformer_lens {tl_version or '-'}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(
        f"model: random GPT-2 ({shape['n_layer']} layers, d_model {shape['n_embd']}, {shape['n_head']} heads, vocab "
        f"{VOCAB}), float32, attention {args.attn!r}; batch {shape['prompts']} prompts x {shape['length']} tokens, "
        f"{shape['corrupted']} corrupted positions each; metric: mean logit difference at the last position"
    )
    for note in notes:
        print(note)
    calls = variants(setup, methods)
    measured = measure(setup, calls, args.rounds, not args.quick)
    memory = {} if args.no_memory or args.quick or not Path("/proc/self/clear_refs").exists() else peak_memory(shape, args.attn, list(calls), args.quick)
    print()
    print("\n".join(report(measured, memory, methods)))
    print(
        "\nforwards: forward passes the method runs (TL: counted calls of HookedTransformer.forward, the clean cache run "
        "included; loop: 1 clean + 1 per cell; NeuronMap: clean + corrupted runs + its stacked groups, result.forwards). "
        "x bare fwd: median over rounds of (sweep time / median bare forward time in that round), i.e. "
        "forward-pass equivalents of work. ratio to TL: median of per-round wall-time ratios to TransformerLens's "
        "run of the same sweep. peak RSS +MB: growth of the resident high-water mark during one run, in its own "
        "process, over the resident set after setup."
    )
    print()
    print("\n".join(summary(setup, measured)))
    print("\n".join(check(measured, methods)))
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
