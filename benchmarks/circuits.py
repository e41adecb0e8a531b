"""CPU benchmark: circuit discovery (AtP, EAP, EAP-IG, exact faithfulness) in NeuronMap and auto-circuit, in bare forwards.

auto-circuit (and the TransformerLens it runs on) is not a dependency of neuronmap; it lives in a separate virtual
environment. From the repository root::

    python3 -m venv .circuits-bench-venv && . .circuits-bench-venv/bin/activate
    pip install -c constraints.txt torch==2.13.0 auto-circuit==1.0.1 "transformer_lens==3.9.0" attrs
    pip install -c constraints.txt -e .
    python benchmarks/circuits.py              # 3 rounds (about 25 minutes on 2 cores) + peak memory (about 20 more)
    python benchmarks/circuits.py --no-memory  # auto-circuit's EAP-IG 10 alone takes 6-7 minutes a round
    python benchmarks/circuits.py --rounds 5
    python benchmarks/circuits.py --quick      # smoke run: 2 layers, EAP-IG 2 and 3, 1 round, no peak memory

auto-circuit 1.0.1 asks for transformer-lens>=1.13 and so would get 4.x, whose HookedTransformer is gone; 2.x needs
transformers<5, which neuronmap does not support; 3.9 works with the transformers (5.x) neuronmap uses, once this
script aliases the key-value cache class TL 3 renamed (``_transformer_lens_3_shim``). auto-circuit also imports
``attr`` without declaring it, hence ``attrs``. So both libraries run in one process, each timed against the same
bare forward. Without auto-circuit installed (e.g. in the dev venv) its rows are skipped.

Model: a randomly initialised GPT-2-small-sized ``GPT2LMHeadModel`` (12 layers, d_model 768, 12 heads, vocab 50257,
n_positions 1024, seed 0, float32, eval mode, SDPA attention), as in ``benchmarks/patching.py``. Nothing is
downloaded. Inputs: 8 prompts x 20 random tokens; the corrupted prompts differ from the clean ones at 3 random
positions each (not the last); per-prompt random correct and wrong answer tokens. Metric: the logit difference
(correct - wrong) at the last position, averaged over prompts. ``torch.set_num_threads(2)``.

Tasks (each timed as a whole call, from the prompts to the scores or faithfulness values):

* ``AtP nodes``     NeuronMap only: ``nm.circuits.atp(model, clean, corrupt, metric, what="z", by="layer_head")``.
* ``EAP``           NeuronMap ``nm.circuits.eap(model, clean, corrupt, metric)`` (every edge of the graph, a head's
                    q/k/v inputs separate: 32,491 edges); auto-circuit ``mask_gradient_prune_scores(model, loader,
                    None, grad_function="logit", answer_function="avg_diff", mask_val=0.0)`` on its factorized graph
                    with separate q/k/v (the same 32,491 edges).
* ``EAP-IG N``      NeuronMap ``eap(..., steps=N)`` (N forward+backward passes, input embeddings interpolated from the
                    corrupted towards the clean ones); auto-circuit ``mask_gradient_prune_scores(...,
                    integrated_grad_samples=N)`` (N + 1 forward+backward passes, every edge's mask interpolated). N = 5, 10
                    (2, 3 with ``--quick``).
* ``EAP-IG act N``  NeuronMap only: ``eap(..., steps=N, ig="activations")`` (each layer's senders moved from their
                    corrupted towards their clean outputs in turn: 1 + (N - 1) x 25 passes, each backward stopping at
                    the moved layer); auto-circuit has no counterpart. N = 5 (2 with ``--quick``).
* ``faithfulness``  the exact faithfulness of the circuits of the 100, 300, 1000, 3000 and 10000 strongest edges of the
                    library's own EAP scores (computed once, untimed). NeuronMap ``scores.faithfulness(sizes,
                    baseline=False)``; auto-circuit ``run_circuits(model, loader, sizes, prune_scores,
                    patch_type=PatchType.TREE_PATCH, ablation_type=AblationType.RESAMPLE)`` plus an unpatched clean and
                    corrupted forward to normalise (0 = corrupted run, 1 = clean run).
* ``circuit k=K``   one circuit: NeuronMap ``scores.select(k=K)`` (choose, prune, measure); auto-circuit
                    ``run_circuits`` with ``[K]``, normalised as above. K = 100, 1000, 10000.

Conventions. Both libraries' faithfulness runs the clean prompts with every edge outside the circuit carrying the
corrupted run's activation (auto-circuit's TREE_PATCH with RESAMPLE ablation; its default EDGE_PATCH instead runs
the corrupted prompts and patches the circuit's edges with clean activations, which is not what NeuronMap
measures), so equal circuits must give equal values. Their EAP scores differ in where the gradient is taken:
auto-circuit by default runs the clean prompts and moves every mask towards the corrupted activations (a noising
gradient at the clean run, score = -d(mean logit diff)/d(mask)); NeuronMap takes it on the corrupted run (denoising).
The cross-checks therefore also run auto-circuit (untimed) with clean and corrupted prompts swapped in its loader,
whose EAP score is exactly minus NeuronMap's raw score, and feed NeuronMap's EAP scores to auto-circuit's
``run_circuits`` so that both measure the same circuits. Edge names are mapped "Resid Start" -> "embed",
"Resid End" -> "logits", "A1.2.Q" -> "A1.2.q".

Timing: after a warm-up (each variant once), every round runs all (method, task) variants in a rotating order, each
preceded by three bare forwards of the corrupted batch (``module(tokens, use_cache=False)``); a round's bare-forward
time is the median of its bare forwards. Reported: median wall and CPU time (``time.process_time``) over rounds, the
median of the per-round ratios to the bare forward ("x bare fwd", wall and CPU) and to auto-circuit's run of the
same task. Peak memory: each variant runs once in a fresh subprocess; after setup (model, inputs, TL conversion,
the untimed EAP scores, one bare forward) the kernel's resident high-water mark is reset (``/proc/self/clear_refs``)
and the growth of VmHWM over VmRSS during the run is reported (Linux only; ``--no-memory`` skips it).
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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # auto-circuit shows progress bars per sample, batch and circuit
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

import neuronmap as nm  # noqa: E402
from harness import interleaved_rounds, resident  # noqa: E402  (benchmarks/harness.py, beside this script)

METHODS = ("neuronmap", "auto-circuit")
FULL = dict(n_layer=12, n_embd=768, n_head=12, prompts=8, length=20, corrupted=3, ig_steps=(5, 10), act_steps=5,
            sizes=[100, 300, 1000, 3000, 10000], ks=[100, 1000, 10000])
QUICK = dict(n_layer=2, n_embd=256, n_head=4, prompts=4, length=8, corrupted=2, ig_steps=(2, 3), act_steps=2,
             sizes=[3, 10, 30, 60, 100], ks=[30, 60, 100])  # 110 edges
VOCAB = 50257
THREADS = 2


def tasks(shape: dict) -> list[str]:
    return (["AtP nodes", "EAP"] + [f"EAP-IG {n}" for n in shape["ig_steps"]] + [f"EAP-IG act {shape['act_steps']}", "faithfulness"]
            + [f"circuit k={k}" for k in shape["ks"]])


@dataclass
class Setup:
    module: torch.nn.Module
    clean: torch.Tensor
    corrupt: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor
    shape: dict
    extra: dict = field(default_factory=dict)  # per-method state built once (models, the untimed EAP scores)


def build(shape: dict) -> Setup:
    """The model and prompts of benchmarks/patching.py (same seeds, so the same weights and tokens)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"], vocab_size=VOCAB, n_positions=1024,
        attn_implementation="sdpa",
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
    return Setup(module, clean, corrupt, answers[0], answers[1], shape)


def mean_logit_diff(setup: Setup, logits: torch.Tensor) -> float:
    """The metric on logits [prompt, pos, vocab] or [prompt, vocab] (the last position already)."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    prompts = torch.arange(len(setup.correct))
    return float((last[prompts, setup.correct] - last[prompts, setup.wrong]).mean())


def bare_forward(setup: Setup) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return setup.module(setup.corrupt, use_cache=False).logits

    return run


# ---------------------------------------------------------------------------------------------- NeuronMap


def nm_variants(setup: Setup) -> dict[str, Callable[[], object]]:
    model = nm.load(setup.module)
    metric = nm.patching.logit_diff(setup.correct, setup.wrong)
    clean, corrupt = setup.clean, setup.corrupt
    scores = nm.circuits.eap(model, clean, corrupt, metric)  # what the faithfulness and circuit tasks start from
    setup.extra["nm_scores"] = scores
    found: dict[str, Callable[[], object]] = {
        "AtP nodes": lambda: nm.circuits.atp(model, clean, corrupt, metric, what="z", by="layer_head"),
        "EAP": lambda: nm.circuits.eap(model, clean, corrupt, metric),
    }
    for n in setup.shape["ig_steps"]:
        found[f"EAP-IG {n}"] = lambda n=n: nm.circuits.eap(model, clean, corrupt, metric, steps=n)
    act = setup.shape["act_steps"]
    found[f"EAP-IG act {act}"] = lambda: nm.circuits.eap(model, clean, corrupt, metric, steps=act, ig="activations")
    found["faithfulness"] = lambda: scores.faithfulness(setup.shape["sizes"], baseline=False)
    for k in setup.shape["ks"]:
        found[f"circuit k={k}"] = lambda k=k: scores.select(k=k)
    return found


# ---------------------------------------------------------------------------------------------- auto-circuit


def auto_circuit_versions() -> tuple[str | None, str | None, str | None]:
    """(auto-circuit version, transformer_lens version, why it cannot run here or None)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ac, tl = version("auto-circuit"), version("transformer_lens")
    except PackageNotFoundError as error:
        return None, None, f"{error.args[0] if error.args else error} is not installed here"
    try:
        _transformer_lens_3_shim()
        from auto_circuit.prune import run_circuits  # noqa: F401
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: F401
        from auto_circuit.utils.graph_utils import patchable_model  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: skip its rows, say why
        return ac, tl, f"auto-circuit {ac} does not import with transformer_lens {tl}: {type(error).__name__}: {error}"
    return ac, tl, None


def _transformer_lens_3_shim() -> None:
    """auto-circuit 1.0.1 imports `transformer_lens.past_key_value_caching.HookedTransformerKeyValueCache` (TL 1.x/2.x);
    TL 3 renamed it `transformer_lens.TransformerLensKeyValueCache` in `transformer_lens.cache`. auto-circuit only
    uses it for type hints and optional prefix caches (unused here), so the old names are aliased to the new class."""
    import importlib.util
    import types

    import transformer_lens

    name = "transformer_lens.past_key_value_caching"
    if name in sys.modules or importlib.util.find_spec(name) is not None:  # TL < 3, or aliased already
        return
    cache = getattr(transformer_lens, "HookedTransformerKeyValueCache", None) or transformer_lens.TransformerLensKeyValueCache
    transformer_lens.HookedTransformerKeyValueCache = cache
    shim = types.ModuleType(name)
    shim.HookedTransformerKeyValueCache = cache
    sys.modules[shim.__name__] = shim
    transformer_lens.past_key_value_caching = shim


def hooked_transformer(module: torch.nn.Module):
    """A HookedTransformer with `module`'s weights (TL's own GPT-2 conversion, no folding or centering, as in
    benchmarks/patching.py), with the hook points auto-circuit's factorized graph needs: per-head results, separate
    q/k/v inputs, the MLP input."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = module.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd, n_layers=c.n_layer,
        n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size, act_fn=c.activation_function,
        use_attn_scale=c.scale_attn_weights, use_local_attn=False,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, normalization_type="LN",
        original_architecture="GPT2LMHeadModel", tokenizer_name=None, init_weights=False, device="cpu",
        dtype=torch.float32, use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True,
    )
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        convert_gpt2_weights(module, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.eval()
    for parameter in model.parameters():  # as auto-circuit's own load_tl_model: only the masks get gradients
        parameter.requires_grad = False
    return model


def ac_loader(setup: Setup, swapped: bool = False):
    """One batch of all prompts; `swapped`: the corrupted prompts in the "clean" slot and vice versa."""
    from auto_circuit.data import PromptDataLoader, PromptDataset

    clean, corrupt = (setup.corrupt, setup.clean) if swapped else (setup.clean, setup.corrupt)
    dataset = PromptDataset(clean, corrupt, [a[None] for a in setup.correct], [w[None] for w in setup.wrong])
    return PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(clean), shuffle=False)


def ac_eap(model, loader, samples: int | None = None) -> dict[str, torch.Tensor]:
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

    return mask_gradient_prune_scores(
        model, loader, None, grad_function="logit", answer_function="avg_diff",
        mask_val=None if samples else 0.0, integrated_grad_samples=samples,
    )


def ac_faithfulness(setup: Setup, model, loader, sizes: list[int], prune_scores) -> dict[int, float]:
    """auto-circuit's exact circuits (TREE_PATCH: clean prompts, every edge outside the circuit resampled from the
    corrupted run), as normalised logit differences: {circuit size: faithfulness}."""
    from auto_circuit.prune import run_circuits
    from auto_circuit.types import AblationType, PatchType

    batch = next(iter(loader))
    with torch.inference_mode():
        clean = mean_logit_diff(setup, model(batch.clean)[model.out_slice])
        corrupt = mean_logit_diff(setup, model(batch.corrupt)[model.out_slice])
    outputs = run_circuits(model, loader, sizes, prune_scores, patch_type=PatchType.TREE_PATCH,
                           ablation_type=AblationType.RESAMPLE)
    return {int(size): (mean_logit_diff(setup, out[batch.key]) - corrupt) / (clean - corrupt) for size, out in outputs.items()}


def ac_variants(setup: Setup) -> dict[str, Callable[[], object]]:
    _transformer_lens_3_shim()
    from auto_circuit.utils.graph_utils import patchable_model

    model = patchable_model(hooked_transformer(setup.module), factorized=True, slice_output="last_seq",
                            separate_qkv=True, device=torch.device("cpu"))
    loader = ac_loader(setup)
    scores = ac_eap(model, loader)
    setup.extra.update(ac_model=model, ac_loader=loader, ac_scores=scores)
    found: dict[str, Callable[[], object]] = {"EAP": lambda: ac_eap(model, loader)}
    for n in setup.shape["ig_steps"]:
        found[f"EAP-IG {n}"] = lambda n=n: ac_eap(model, loader, n)
    found["faithfulness"] = lambda: ac_faithfulness(setup, model, loader, setup.shape["sizes"], scores)
    for k in setup.shape["ks"]:
        found[f"circuit k={k}"] = lambda k=k: ac_faithfulness(setup, model, loader, [k], scores)
    return found


# ---------------------------------------------------------------------------------------------- measuring


def variants(setup: Setup, methods: list[str]) -> dict[tuple[str, str], Callable[[], object]]:
    found = {}
    for method in methods:
        calls = nm_variants(setup) if method == "neuronmap" else ac_variants(setup)
        found.update({(method, task): call for task, call in calls.items()})
    return found


def measure(setup: Setup, calls: dict, rounds: int, progress: bool) -> dict:
    bare = bare_forward(setup)
    for _ in range(3):
        bare()
    for call in calls.values():  # warm-up
        call()
    return interleaved_rounds(bare, calls, rounds, "auto-circuit", progress)


# ---------------------------------------------------------------------------------------------- peak memory


def memory_child(shape: dict, method: str, task: str) -> dict:
    """In a fresh process: set up, reset the resident high-water mark, run one variant, report the peak's growth."""
    import gc

    torch.set_num_threads(THREADS)
    setup = build(shape)
    call = bare_forward(setup) if method == "bare-forward" else variants(setup, [method])[method, task]
    bare_forward(setup)()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = resident()
    call()
    after = resident()
    return {"growth": after["VmHWM"] - before["VmRSS"], "baseline": before["VmRSS"]}


def peak_memory(shape: dict, keys: list[tuple[str, str]], quick: bool) -> dict:
    found = {}
    for method, task in [("bare-forward", "-"), *keys]:
        command = [sys.executable, __file__, "--memory-child", method, task] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  peak memory of {method} {task} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        found[method, task] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


# ---------------------------------------------------------------------------------------------- cross-checks


def ac_edge_scores(model, prune_scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """auto-circuit's scores by NeuronMap edge name."""
    def rename(name: str) -> str:
        name = {"Resid Start": "embed", "Resid End": "logits"}.get(name, name)
        return name[:-1] + name[-1].lower() if name[-2:] in (".Q", ".K", ".V") else name

    return {f"{rename(e.src.name)}->{rename(e.dest.name)}": float(prune_scores[e.dest.module_name][e.patch_idx])
            for e in model.edges}


def as_prune_scores(model, names: list[str], values: torch.Tensor) -> dict[str, torch.Tensor]:
    """NeuronMap's scores (in the order of `names`) as auto-circuit PruneScores, so its run_circuits picks the same
    circuits."""
    by_name = dict(zip(names, values.tolist()))
    out = {w.module_name: torch.zeros_like(w.patch_mask) for w in model.dest_wrappers}
    probe = ac_edge_scores(model, {k: torch.zeros_like(v) for k, v in out.items()})  # the names, in edge order
    for edge, name in zip(model.edges, probe):
        out[edge.dest.module_name][edge.patch_idx] = by_name[name]
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def cross_check(setup: Setup, measured: dict, methods: list[str]) -> list[str]:
    results = measured["results"]
    lines = []
    nm_scores = setup.extra.get("nm_scores")
    if nm_scores is not None:
        atp = results["neuronmap", "AtP nodes"]
        lines.append(f"NeuronMap: clean {nm_scores.clean:.5f}, corrupted {nm_scores.corrupt:.5f}; {nm_scores.graph!r}")
        lines.append(f"AtP nodes: {tuple(atp.raw.shape)} estimates from {float(atp.raw.min()):.4f} to {float(atp.raw.max()):.4f}")
        act, steps = results["neuronmap", f"EAP-IG act {setup.shape['act_steps']}"], setup.shape["act_steps"]
        inputs = results.get(("neuronmap", f"EAP-IG {steps}"))
        if inputs is not None:
            valid = act.graph.valid
            lines.append(f"EAP-IG {steps} on activations vs on inputs: Pearson r = {pearson(act.raw[valid], inputs.raw[valid]):.4f}")
        curve = results["neuronmap", "faithfulness"]
        lines.append("NeuronMap faithfulness " + ", ".join(f"{s}: {v:.4f}" for s, v in zip(curve.sizes, curve.values)))
        for k in setup.shape["ks"]:
            chosen = results["neuronmap", f"circuit k={k}"]
            lines.append(f"NeuronMap select(k={k}): {int(chosen.circuit.sum())} edges after pruning, faithfulness "
                         f"{chosen.circuit_faithfulness:.4f}")
    if "auto-circuit" not in methods or nm_scores is None:
        return lines
    model, loader = setup.extra["ac_model"], setup.extra["ac_loader"]
    names = nm_scores.graph.edge_names()
    n = len(names)
    with torch.inference_mode():
        tl_logits = model(setup.corrupt)
        hf_logits = setup.module(setup.corrupt, use_cache=False).logits
    lines.append(f"TL model vs HF module: max |logit difference| {float((tl_logits - hf_logits).abs().max()):.2e}; "
                 f"auto-circuit edges {len(model.edges)}, NeuronMap edges {n}")

    def aligned(prune_scores) -> torch.Tensor:
        by_name = ac_edge_scores(model, prune_scores)
        missing = set(names) ^ set(by_name)
        if missing:
            raise AssertionError(f"edge names differ, e.g. {sorted(missing)[:5]}")
        return torch.tensor([by_name[name] for name in names])

    swapped = ac_loader(setup, swapped=True)
    nm_raw = {"EAP": nm_scores.raw[nm_scores.graph.valid]}
    for steps in setup.shape["ig_steps"]:
        r = results["neuronmap", f"EAP-IG {steps}"]
        nm_raw[f"EAP-IG {steps}"] = r.raw[r.graph.valid]
    lines.append("Pearson r of edge scores, NeuronMap raw vs auto-circuit (default: gradient at the clean run, noising; "
                 "swapped: prompts swapped in its loader, gradient at the corrupted run, sign flipped):")
    for task, ours in nm_raw.items():
        samples = None if task == "EAP" else int(task.split()[-1])
        default = aligned(results["auto-circuit", task])
        flipped = -aligned(ac_eap(model, swapped, samples))
        scale = float((flipped * ours).sum() / (flipped * flipped).sum())
        lines.append(f"  {task:10} default r = {pearson(ours, default):.4f}; swapped r = {pearson(ours, flipped):.6f}, "
                     f"max |NM - (-AC swapped) x {scale:.3g}| = {float((ours - scale * flipped).abs().max()):.2e} "
                     f"(max |NM| {float(ours.abs().max()):.3g})")
    ac_default = aligned(setup.extra["ac_scores"])
    sizes = setup.shape["sizes"]
    ours_top = nm_raw["EAP"].abs().argsort(descending=True)
    theirs_top = ac_default.abs().argsort(descending=True)
    overlap = [len(set(ours_top[:s].tolist()) & set(theirs_top[:s].tolist())) / s for s in sizes]
    timed_curve = results["auto-circuit", "faithfulness"]
    nm_curve = results["neuronmap", "faithfulness"]
    lines.append("faithfulness of each library's own EAP circuits (timed runs): size: NeuronMap / auto-circuit "
                 "(shared edges)")
    lines.append("  " + "; ".join(f"{s}: {v:.4f} / {timed_curve.get(s, float('nan')):.4f} ({o:.0%})"
                                  for s, v, o in zip(nm_curve.sizes, nm_curve.values, overlap)))
    same = ac_faithfulness(setup, model, loader, sizes, as_prune_scores(model, names, nm_raw["EAP"]))
    diffs = [abs(v - same.get(s, float("nan"))) for s, v in zip(nm_curve.sizes, nm_curve.values)]
    lines.append("faithfulness of the same circuits (NeuronMap's EAP top-k fed to auto-circuit's run_circuits): "
                 + "; ".join(f"{s}: {v:.5f} / {same.get(s, float('nan')):.5f}" for s, v in zip(nm_curve.sizes, nm_curve.values)))
    lines.append(f"  max |NeuronMap - auto-circuit| = {max(diffs):.2e}, Pearson r over sizes = "
                 f"{pearson(torch.tensor(nm_curve.values), torch.tensor([same.get(s, float('nan')) for s in nm_curve.sizes])):.6f}")
    return lines


# ---------------------------------------------------------------------------------------------- report


def report(measured: dict, memory: dict, keys: list[tuple[str, str]], task_order: list[str]) -> list[str]:
    rec = measured["rec"]
    lines = [
        f"{'method':13} {'task':15} {'wall (s)':>9} {'CPU (s)':>8} {'x bare fwd':>10} {'x bare CPU':>10} "
        f"{'ratio to AC':>11} {'peak RSS +MB':>12}"
    ]
    for task in task_order:
        for method in METHODS:
            key = (method, task)
            if key not in keys:
                continue
            r = rec[key]
            to_ac = f"{statistics.median(r['to_ref']):.3f}x" if r["to_ref"] else "n/a"
            lines.append(
                f"{method:13} {task:15} {statistics.median(r['wall']):9.3f} {statistics.median(r['cpu']):8.3f} "
                f"{statistics.median(r['x_wall']):9.1f}x {statistics.median(r['x_cpu']):9.1f}x {to_ac:>11} "
                f"{_mb(memory.get(key)):>12}"
            )
    lines.append(
        f"{'bare HF fwd':13} {'-':15} {statistics.median(measured['bare_wall']):9.4f} "
        f"{statistics.median(measured['bare_cpu']):8.4f} {1.0:9.1f}x {1.0:9.1f}x {'':>11} "
        f"{_mb(memory.get(('bare-forward', '-'))):>12}"
    )
    return lines


def _mb(memory: dict | None) -> str:
    return f"{memory['growth'] / 2**20:.0f}" if memory else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="2 layers x 256 wide, 4 prompts x 8 tokens, EAP-IG with 2 and 3 steps, 1 round, no peak memory: a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.memory_child:
        print(json.dumps(memory_child(shape, *args.memory_child)))
        return 0

    import transformers

    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    ac_version, tl_version, why_not = auto_circuit_versions()
    methods = list(METHODS)
    if why_not:
        methods.remove("auto-circuit")
    setup = build(shape)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, auto-circuit {ac_version or '-'}, "
        f"transformer_lens {tl_version or '-'}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(
        f"model: random GPT-2 ({shape['n_layer']} layers, d_model {shape['n_embd']}, {shape['n_head']} heads, vocab "
        f"{VOCAB}), float32, attention 'sdpa'; batch {shape['prompts']} prompts x {shape['length']} tokens, "
        f"{shape['corrupted']} corrupted positions each; metric: mean logit difference at the last position; "
        f"circuit sizes {shape['sizes']}, k {shape['ks']}"
    )
    if why_not:
        print(f"auto-circuit rows skipped: {why_not} (see the docstring for its venv).")
    calls = variants(setup, methods)
    measured = measure(setup, calls, args.rounds, not args.quick)
    keys = list(calls)
    memory = {} if args.no_memory or args.quick or not Path("/proc/self/clear_refs").exists() else peak_memory(shape, keys, args.quick)
    print()
    print("\n".join(report(measured, memory, keys, tasks(shape))))
    print(
        "\nx bare fwd: median over rounds of (task time / median bare forward time in that round), i.e. forward-pass "
        "equivalents of work. ratio to AC: median of per-round wall-time ratios to auto-circuit's run of the same task "
        "(EAP-IG N: NeuronMap N passes over interpolated embeddings, auto-circuit N + 1 over interpolated edge masks). "
        "faithfulness / circuit: each library's circuits from its own untimed EAP scores; auto-circuit's time includes "
        "the unpatched clean and corrupted forwards it needs to normalise. peak RSS +MB: growth of the resident "
        "high-water mark during one run, in its own process, over the resident set after setup."
    )
    print()
    print("\n".join(cross_check(setup, measured, methods)))
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
