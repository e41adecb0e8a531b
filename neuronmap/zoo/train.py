"""Retrain a zoo model from its recipe:
`python -m neuronmap.zoo.train NAME [--quick] [--seed N] [--out DIR | --replace-shipped]`.

By default the result goes to a new directory, `./NAME-retrained` (or `--out DIR`); the copy shipped in the
package (`neuronmap/zoo/models/NAME/`, tracked files in a source checkout) is replaced only with
`--replace-shipped`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from . import MODELS_DIR, SAES, SAES_DIR, TRAINED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronmap.zoo.train", description=__doc__.splitlines()[1].strip("`"))
    parser.add_argument("name", choices=sorted(TRAINED) + sorted(SAES))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="new or empty directory to write (default: ./NAME-retrained)")
    where.add_argument("--replace-shipped", action="store_true", help="overwrite the model shipped in the package, card included")
    parser.add_argument("--quick", action="store_true", help="shortened run that shows the mechanism appearing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shipped = SAES_DIR / args.name if args.name in SAES else MODELS_DIR / args.name
    out = shipped if args.replace_shipped else args.out or Path(f"{args.name}-retrained")
    if not args.replace_shipped:
        if out.resolve() == shipped.resolve():
            parser.error(f"{out} is the shipped model: pass --replace-shipped to overwrite it")
        if out.exists() and any(out.iterdir()):
            parser.error(f"{out} is not empty: choose a new directory with --out")
    recipe = importlib.import_module(f"neuronmap.zoo.recipes.{TRAINED.get(args.name) or SAES[args.name]}")
    out.mkdir(parents=True, exist_ok=True)
    card = recipe.train(out, quick=args.quick, seed=args.seed)
    print(json.dumps({"name": card["name"], "mechanisms": card["mechanisms"]}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
