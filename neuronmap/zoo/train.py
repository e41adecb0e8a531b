"""Retrain a zoo model from its recipe: `python -m neuronmap.zoo.train NAME [--quick] [--out DIR] [--seed N]`.

By default the result replaces the shipped copy in the package's `zoo/models/NAME/`, card included.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from . import MODELS_DIR, TRAINED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronmap.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(TRAINED))
    parser.add_argument("--out", type=Path, help="directory to write (default: the package's shipped copy)")
    parser.add_argument("--quick", action="store_true", help="shortened run that shows the mechanism appearing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipe = importlib.import_module(f"neuronmap.zoo.recipes.{TRAINED[args.name]}")
    out = args.out or MODELS_DIR / args.name
    out.mkdir(parents=True, exist_ok=True)
    card = recipe.train(out, quick=args.quick, seed=args.seed)
    print(json.dumps({"name": card["name"], "mechanisms": card["mechanisms"]}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
