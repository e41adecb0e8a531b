"""The SAE benchmark of issue 12, in one run: the training step (`sae_training.py`: NeuronMap's trainer against a
hand-written minimal step and SAELens's, 768 → 6144, batch 4096, ReLU and TopK, 2 threads, interleaved rounds) and
the feature dashboards (`sae_dashboards.py`: statistics of every latent in one pass against the bare forward to the
hook + encode and against sae-dashboard 0.8.0, page sizes, offline rendering in Chromium).

    .saelens-venv/bin/python benchmarks/sae.py [--training-rounds 9] [--dashboard-rounds 2]

Run it with the SAELens environment's Python (`python3 -m venv .saelens-venv && .saelens-venv/bin/pip install -c
constraints.txt sae-lens -e .`); the dashboard half starts sae-dashboard in its own environment (`.saedash-venv`, see
`sae_dashboards.py`). Each half's module doc says exactly what it times; the results of a run on this project's
machine are in `RESULTS-sae-training.md` and `RESULTS-sae-dashboards.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sae_dashboards  # noqa: E402
import sae_training  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training-rounds", type=int, default=9)
    parser.add_argument("--dashboard-rounds", type=int, default=2)
    parser.add_argument("--sequences", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    training = sae_training.run(args.training_rounds, threads=2)
    print("## Training step (× the hand-written step's throughput)\n")
    print(sae_training.markdown(training), flush=True)
    dashboards = sae_dashboards.benchmark(args.sequences, args.dashboard_rounds)
    print("\n## Feature dashboards\n")
    print(sae_dashboards.markdown(dashboards))
    results = {"training": training, "dashboards": dashboards}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
