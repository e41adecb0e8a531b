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

from ..errors import LoadError
from . import MODELS_DIR, SAES, SAES_DIR, TRAINED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronmap.zoo.train", description=__doc__.splitlines()[1].strip("`"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        retrain(args.name, out=args.out, replace_shipped=args.replace_shipped, quick=args.quick, seed=args.seed)
    except LoadError as error:
        parser.error(str(error))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The retraining options, shared by this module's command and `neuronmap zoo train`."""
    parser.add_argument("name", choices=sorted(TRAINED) + sorted(SAES), help="the zoo model or SAE to retrain")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="new or empty directory to write (default: ./NAME-retrained)")
    where.add_argument("--replace-shipped", action="store_true", help="overwrite the model shipped in the package, card included")
    parser.add_argument("--quick", action="store_true", help="shortened run that shows the mechanism appearing")
    parser.add_argument("--seed", type=int, default=0)


def retrain(name: str, *, out: Path | None = None, replace_shipped: bool = False, quick: bool = False,
            seed: int = 0) -> Path:
    """Train zoo entry `name` from its recipe into `out` (default `./NAME-retrained`, which must be new or empty)
    or, with `replace_shipped`, over the copy shipped in the package; print its measured mechanisms."""
    shipped = SAES_DIR / name if name in SAES else MODELS_DIR / name
    out = shipped if replace_shipped else Path(out or f"{name}-retrained")
    if not replace_shipped:
        if out.resolve() == shipped.resolve():
            raise LoadError(f"{out} is the shipped model: pass --replace-shipped to overwrite it")
        if out.exists() and any(out.iterdir()):
            raise LoadError(f"{out} is not empty: choose a new directory with --out")
    recipe = importlib.import_module(f"neuronmap.zoo.recipes.{TRAINED.get(name) or SAES[name]}")
    out.mkdir(parents=True, exist_ok=True)
    card = recipe.train(out, quick=quick, seed=seed)
    print(json.dumps({"name": card["name"], "mechanisms": card["mechanisms"]}, indent=2))
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
