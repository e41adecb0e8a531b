"""`python -m neuronmap.course solve NOTEBOOK OUTPUT [--solutions FILE]`: write a tutorial's solved copy."""

from __future__ import annotations

import argparse
import sys

from .solutions import SolutionError, solve


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 when the notebook and its solutions do not match)."""
    parser = argparse.ArgumentParser(prog="python -m neuronmap.course", description="Course tools for NeuronMap's tutorials.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "solve",
        help="write a tutorial with its exercise cells filled in from its solution file",
        description="Write NOTEBOOK to OUTPUT with each cell tagged exercise-N replaced by the `# %% exercise-N` "
        "block of its solution file (by default solutions/<notebook name>.py beside the notebook).",
    )
    command.add_argument("notebook")
    command.add_argument("output")
    command.add_argument("--solutions", help="the solution file (default: solutions/<notebook name>.py beside NOTEBOOK)")
    args = parser.parse_args(argv)
    try:
        written = solve(args.notebook, args.output, args.solutions)
    except SolutionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"solved copy written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
