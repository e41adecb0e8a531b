"""SAE feature dashboards: NeuronMap's one-pass statistics of every latent against sae-dashboard 0.8.0 and against the
bare forward to the hook plus the SAE's encode, on the same model, SAE and tokens; page sizes; offline rendering.

    python3 -m venv .saedash-venv
    .saedash-venv/bin/pip install -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    .saedash-venv/bin/pip install -c constraints.txt sae-dashboard==0.8.0 "pyarrow<18"
    .saedash-venv/bin/pip uninstall -y torchvision torchaudio   # built for other torch versions; nothing here uses them
    .venv/bin/python benchmarks/sae_dashboards.py --sequences 2000 8000 --rounds 2 --pairs 3

(`pyarrow<18`: sae-dashboard's transformer-lens 2.17 pins numpy<2, which the newest pyarrow refuses.)

Model: a randomly initialised 2-layer GPT-2 (d_model 128, 4 heads, vocab 50257, `torch.manual_seed(0)`) with a
word-level tokenizer of the same size (no hub); tokens: random ids, 64 per sequence (seed 1). SAE: TopK, 128 → 512,
k = 32, on `blocks.1.hook_resid_post`, unit-norm decoder rows (seed 0), written in SAELens's format by NeuronMap and
loaded by both. `rescale_acts_by_decoder_norm` is on: with unit-norm rows it changes nothing, and sae-dashboard
refuses a TopK SAE without it (it folds decoder norms into the encoder first). sae-dashboard gets a
`HookedSAETransformer` built offline from the same weights (TransformerLens's GPT-2 conversion, no processing).

Each round runs, per number of sequences, two child processes on one thread each:
  pairs       `--pairs` pairs, alternating which goes first, of
                bare       the HF model's forward stopped after block 1 by a hook, then `sae.encode`, batches of 32
                           sequences: the least any tool must do to see every latent's activations, and
                neuronmap  `nm.sae.feature_statistics(sae, model, tokens)`: every latent's top-k with contexts,
                           histogram, density, max, mean, interval samples, per-token top latents (batches of 32);
              (pairs in one process, back to back, so a busy machine slows both alike), then NeuronMap's logit
              effects (weights only), its static page (32 dashboards embedded, all latents listed) and a page
              embedding all 512 dashboards;
  saedash     `SaeVisRunner(SaeVisConfig(hook_point, features=range(512))).run(...)` with its defaults, then
              `save_feature_centric_vis` for all 512 features and for the first 32.
Afterwards Chromium opens NeuronMap's page and sae-dashboard's 32-feature page with every request leaving the machine
refused, and says what each shows. `benchmark()` returns all numbers; `markdown()` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HOOK = "blocks.1.hook_resid_post"
LENGTH = 64
BATCH = 32
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "sae-dashboards-bench"
SAEDASH_PYTHON = ROOT / ".saedash-venv" / "bin" / "python"
NEURONMAP_PYTHON = ROOT / ".venv" / "bin" / "python" if (ROOT / ".venv" / "bin" / "python").exists() else Path(sys.executable)
"""Where NeuronMap's phases and the Chromium check run: the development environment (it has Playwright), whichever
environment calls `benchmark()`."""
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def benchmark(sequences=(2000, 8000), rounds: int = 2, pairs: int = 3, out_dir: Path = OUT,
              saedash_python: Path = SAEDASH_PYTHON, neuronmap_python: Path = NEURONMAP_PYTHON,
              progress: bool = True) -> dict:
    """Every measurement of the module doc: `rounds` rounds, each of them, per number of sequences, `pairs` bare /
    NeuronMap pairs in one process and then one sae-dashboard run; the combined `benchmarks/sae.py` calls this."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _child(neuronmap_python, "prepare", max(sequences), out_dir)
    runs = {(phase, n): [] for phase in ("pairs", "saedash") for n in sequences}
    load = []
    for round_ in range(rounds):
        for n in sequences:
            for phase in ("pairs", "saedash"):
                python = saedash_python if phase == "saedash" else neuronmap_python
                result = _child(python, phase, n, out_dir, pairs)
                runs[(phase, n)].append(result)
                load.append(os.getloadavg()[0])
                if progress:
                    took = [f"{r['wall_s']:.1f}" for r in result["neuronmap"]] if phase == "pairs" else [f"{result['wall_s']:.1f}"]
                    print(f"round {round_ + 1} {n:5d} sequences: {phase} {', '.join(took)} s", flush=True)
    render = _child(neuronmap_python, "render", max(sequences), out_dir)
    return {"runs": {f"{phase}:{n}": value for (phase, n), value in runs.items()}, "render": render,
            "agreement": {n: _agreement(out_dir, n) for n in sequences}, "sequences": list(sequences),
            "rounds": rounds, "pairs": pairs, "load": load}


def _agreement(out: Path, n: int) -> dict:
    """The largest differences between NeuronMap's and sae-dashboard's per-latent max activation and density."""
    mine, theirs = (json.loads((out / f"{tool}-{n}.json").read_text()) for tool in ("neuronmap", "saedash"))
    return {key: max(abs(a - b) for a, b in zip(mine[key], theirs[key])) for key in ("max", "density")}


def _child(python, phase: str, n: int, out_dir: Path, pairs: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [str(python), __file__, "--phase", phase, "--sequences", str(n), "--out-dir", str(out_dir), "--pairs", str(pairs)]
    done = subprocess.run(command,
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{phase} ({n} sequences) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the phases, each in its own process ------------------------------------------------------------------------------


def prepare(n: int, out: Path, count: int = 1) -> dict:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from neuronmap.sae import SAE

    if (out / "tokens.pt").exists() and torch.load(out / "tokens.pt", weights_only=True).shape[0] >= n:
        return {}
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024,
                                     bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(out / "model")
    vocab = {f"t{i}": i for i in range(50256)}
    vocab["<|endoftext|>"] = 50256
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                         unk_token="<|endoftext|>", model_max_length=1024).save_pretrained(out / "model")
    tokens = torch.randint(0, 50257, (n, LENGTH), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, out / "tokens.pt")
    SAE("topk", d_in=128, d_sae=512, k=32, hook_name=HOOK, seed=0, rescale_acts_by_decoder_norm=True).save(out / "sae")
    return {}


def _tokens(out: Path, n: int):
    import torch

    torch.set_num_threads(1)
    return torch.load(out / "tokens.pt", weights_only=True)[:n]


def pairs(n: int, out: Path, count: int) -> dict:
    """`count` pairs of the bare reference and NeuronMap's statistics, alternating (which goes first alternates too),
    then NeuronMap's logit effects and pages once."""
    import neuronmap as nm
    from neuronmap.sae import SAE
    from neuronmap.sae.features import feature_statistics

    tokens = _tokens(out, n)
    model = nm.load(str(out / "model"))
    sae = SAE.load(out / "sae")
    reference = _bare(model.module, sae)
    statistics_of = lambda rows: feature_statistics(sae, model, rows, batch_size=BATCH, progress=False)
    reference(tokens[:BATCH]), statistics_of(tokens[:BATCH])  # warm-up, untimed
    measured, stats = {"bare": [], "neuronmap": []}, None
    for pair in range(count):
        order = [("bare", reference), ("neuronmap", statistics_of)]
        for name, call in order if pair % 2 == 0 else order[::-1]:
            result = _timed(lambda: call(tokens))
            kept = result.pop("result")
            stats = kept if name == "neuronmap" else stats
            measured[name].append(result)
    logits = _timed(lambda: stats.logits)
    page, full = out / f"neuronmap-{n}.html", out / f"neuronmap-all-{n}.html"
    written = _timed(lambda: stats.save_html(page))
    everything = _timed(lambda: stats.browser(n=512, budget=10**9).save_html(full))
    agreement = {"max": stats.max.tolist(), "density": stats.density.tolist()}
    (out / f"neuronmap-{n}.json").write_text(json.dumps(agreement))
    return {**measured, "logits_s": logits["wall_s"], "page_s": written["wall_s"], "page_bytes": page.stat().st_size,
            "page_all_s": everything["wall_s"], "page_all_bytes": full.stat().st_size, "tokens": stats.n_tokens}


def _bare(model, sae):
    """The HF model's forward stopped after block 1 by a hook that raises, then `sae.encode`, batch by batch."""
    import torch

    class Stop(Exception):
        pass

    def stop(module, args, output):
        raise Stop(output[0] if isinstance(output, tuple) else output)

    def run(rows):
        handle = model.transformer.h[1].register_forward_hook(stop)
        try:
            with torch.no_grad():
                for batch in rows.split(BATCH):
                    try:
                        model.transformer(input_ids=batch, use_cache=False)
                    except Stop as caught:
                        sae.encode(caught.args[0])
        finally:
            handle.remove()

    return run


def saedash(n: int, out: Path, count: int = 1) -> dict:
    import torch
    import transformers
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    tokens = _tokens(out, n)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out / "model").eval()
    # transformers 4.56 (sae-dashboard's) cannot read transformers 5's tokenizer_config; TransformerLens reloads the
    # tokenizer by its name_or_path, so it is written once more in the old format
    special = {name: "<|endoftext|>" for name in ("bos_token", "eos_token", "unk_token")}
    old = out / "tokenizer-4"
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "model" / "tokenizer.json"), **special).save_pretrained(old)
    tokenizer = transformers.AutoTokenizer.from_pretrained(old)
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel", positional_embedding_type="standard", default_prepend_bos=False,
    )
    model = HookedSAETransformer(cfg, tokenizer)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    with torch.no_grad():
        same = float((model(tokens[:2]) - hf(tokens[:2]).logits).abs().max())
    sae = SAE.load_from_disk(out / "sae")

    def run(rows, features):
        return SaeVisRunner(SaeVisConfig(hook_point=HOOK, features=features)).run(encoder=sae, model=model, tokens=rows)

    run(tokens[:BATCH], range(16))  # warm-up, untimed
    result = _timed(lambda: run(tokens, range(512)))
    data = result.pop("result")
    page, first = out / f"saedash-{n}.html", out / f"saedash-32-{n}.html"
    written = _timed(lambda: save_feature_centric_vis(sae_vis_data=data, filename=page))
    save_feature_centric_vis(sae_vis_data=data, filename=first, include_only=list(range(32)))
    stats = data.feature_stats
    agreement = {"max": list(stats.max), "density": list(stats.frac_nonzero)}
    (out / f"saedash-{n}.json").write_text(json.dumps(agreement))
    return {**result, "page_s": written["wall_s"], "page_bytes": page.stat().st_size,
            "page_32_bytes": first.stat().st_size, "logit_difference_to_hf": same}


def render(n: int, out: Path, count: int = 1) -> dict:
    """What each page shows in Chromium with every request leaving the machine refused."""
    from playwright.sync_api import sync_playwright

    pages = {"neuronmap": out / f"neuronmap-{n}.html", "saedash": out / f"saedash-32-{n}.html"}
    found = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for name, path in pages.items():
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            refused, errors = [], []
            page.on("pageerror", lambda error: errors.append(str(error)[:200]))
            page.route(lambda url: not url.startswith(("file:", "data:", "blob:", "about:")),
                       lambda route: (refused.append(route.request.url), route.abort()))
            start = time.perf_counter()
            page.goto(path.as_uri(), timeout=120_000)
            if name == "neuronmap":
                page.wait_for_selector(".nm-sae[data-ready]", timeout=30_000)
            else:
                page.wait_for_timeout(3000)
            ready = time.perf_counter() - start
            shown = page.evaluate("""() => ({
              text: document.body.innerText.length,
              tokens: document.querySelectorAll('.nm-sae-token').length,
              svg: document.querySelectorAll('svg rect, svg path').length,
              canvas: document.querySelectorAll('canvas').length,
              plotly: document.querySelectorAll('.plotly, .js-plotly-plot').length,
            })""")
            page.screenshot(path=str(out / f"render-{name}.png"))
            found[name] = {"ready_s": ready, "refused": refused, "errors": errors[:3], **shown}
            page.close()
        browser.close()
    return found


def _timed(call) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "result": result}


# --- the table -------------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The results as two Markdown tables: times (medians, and the spread of the paired ratios), then pages."""
    runs = results["runs"]
    median = statistics.median
    spread = lambda values: f"{median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"
    lines = [
        "| sequences (× 64 tokens) | bare forward to the hook + encode | NeuronMap statistics, all 512 latents | "
        "NeuronMap ÷ bare, wall | NeuronMap ÷ bare, CPU | sae-dashboard, all 512 latents | sae-dashboard ÷ NeuronMap |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in results["sequences"]:
        pair_runs, sd_runs = runs[f"pairs:{n}"], runs[f"saedash:{n}"]
        bare = [r for p in pair_runs for r in p["bare"]]
        mine = [r for p in pair_runs for r in p["neuronmap"]]
        wall = [a["wall_s"] / b["wall_s"] for a, b in zip(mine, bare)]
        cpu = [a["cpu_s"] / b["cpu_s"] for a, b in zip(mine, bare)]
        # each sae-dashboard run against the median NeuronMap run of the pairs just before it
        speedup = [s["wall_s"] / median([r["wall_s"] for r in p["neuronmap"]]) for s, p in zip(sd_runs, pair_runs)]
        lines.append(
            f"| {n:,} | {median([r['wall_s'] for r in bare]):.2f} s | {median([r['wall_s'] for r in mine]):.2f} s"
            f" | {spread(wall)} | {spread(cpu)} | {median([r['wall_s'] for r in sd_runs]):.1f} s | {spread(speedup)} |"
        )
    lines += ["", "| sequences | NeuronMap logit effects (all 512) | NeuronMap page: 32 dashboards, 512 listed | NeuronMap "
              "page: all 512 dashboards | sae-dashboard page: 512 features | sae-dashboard page: 32 features |",
              "|---|---|---|---|---|---|"]
    mb = lambda size: f"{size / 1e6:.2f} MB"
    for n in results["sequences"]:
        pair_runs, sd_runs = runs[f"pairs:{n}"], runs[f"saedash:{n}"]
        lines.append(
            f"| {n:,} | {median([r['logits_s'] for r in pair_runs]):.2f} s | {mb(pair_runs[-1]['page_bytes'])} in "
            f"{median([r['page_s'] for r in pair_runs]):.2f} s | {mb(pair_runs[-1]['page_all_bytes'])} in "
            f"{median([r['page_all_s'] for r in pair_runs]):.2f} s | {mb(sd_runs[-1]['page_bytes'])} in "
            f"{median([r['page_s'] for r in sd_runs]):.1f} s | {mb(sd_runs[-1]['page_32_bytes'])} |"
        )
    lines.append("")
    for n in results["sequences"]:
        agreement = results["agreement"][str(n)] if str(n) in results["agreement"] else results["agreement"][n]
        lines.append(f"- {n:,} sequences: per-latent max activation within {agreement['max']:.1e} of sae-dashboard's, "
                     f"density within {agreement['density']:.1e}")
    for tool, seen in results["render"].items():
        lines.append(f"- {tool} page in Chromium, offline: {seen['tokens']} tokens and {seen['svg']} chart shapes drawn, "
                     f"{len(seen['refused'])} requests refused ({', '.join(seen['refused']) or 'none'}), script errors: "
                     f"{'; '.join(seen['errors']) or 'none'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running sae-dashboard once")
    parser.add_argument("--out-dir", type=Path, default=OUT)
    parser.add_argument("--saedash-python", type=Path, default=SAEDASH_PYTHON)
    parser.add_argument("--pairs", type=int, default=3, help="bare / NeuronMap pairs per round, in one process")
    parser.add_argument("--phase", choices=["prepare", "pairs", "saedash", "render"])
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    if args.phase:
        phase = globals()[args.phase]
        print(json.dumps(phase(args.sequences[0], args.out_dir, args.pairs)))
        return
    results = benchmark(args.sequences, args.rounds, args.pairs, args.out_dir, args.saedash_python)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
