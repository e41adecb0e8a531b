"""Write a tutorial's solved copy: its exercise cells filled in from the tutorial's solution file.

The tutorials are committed as student copies: each exercise's answer cell holds a placeholder (`answer = ...`)
and is tagged `exercise-N`. The working answers live beside them, in `solutions/<notebook name>.py`, one block
per exercise opened by a `# %% exercise-N` line (Jupytext's percent format, so editors show them as cells). The
solved copy is what CI executes to prove every exercise solvable, and what the README demo runs:

    python -m neuronmap.course solve tutorials/02_attention_heads.ipynb build/02_attention_heads.ipynb

Notebooks are read and written as plain JSON (nbformat 4), so this needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["SolutionError", "exercise_tags", "read_solutions", "solution_path", "solve"]

EXERCISE_TAG = re.compile(r"^exercise-\d+$")
_BLOCK = re.compile(r"^# %% (\S+)\s*$")


class SolutionError(ValueError):
    """A notebook and its solution file do not match: a tag without a solution, or a solution without a cell."""


def solve(notebook: str | Path, output: str | Path, solutions: str | Path | None = None) -> Path:
    """Write `notebook` to `output` with each `exercise-N` cell's source replaced by its solution block.

    `solutions` defaults to `solution_path(notebook)`. Every output is cleared (the copy is meant to be executed,
    and a student copy's "not yet" outputs would be stale). Raises `SolutionError` unless the exercise tags and
    the solution blocks match one to one, or when `output` is `notebook` itself. Returns the output path.
    """
    notebook, output = Path(notebook), Path(output)
    if output.resolve() == notebook.resolve():
        raise SolutionError(f"the solved copy would overwrite the student copy {notebook}: write it elsewhere")
    solutions = solution_path(notebook) if solutions is None else Path(solutions)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    blocks = read_solutions(solutions)
    cells = _exercise_cells(nb, notebook)
    missing = [tag for tag in cells if tag not in blocks]
    unused = [tag for tag in blocks if tag not in cells]
    if missing or unused:
        problems = []
        if missing:
            problems.append(f"no solution in {solutions} for the cells tagged {', '.join(missing)}")
        if unused:
            problems.append(f"no cell of {notebook} is tagged {', '.join(unused)}, which {solutions} solves")
        raise SolutionError("; ".join(problems))
    for tag, cell in cells.items():
        cell["source"] = blocks[tag]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return output


def solution_path(notebook: str | Path) -> Path:
    """Where a tutorial's solutions live: `solutions/<notebook stem>.py` beside the notebook."""
    notebook = Path(notebook)
    return notebook.parent / "solutions" / f"{notebook.stem}.py"


def exercise_tags(notebook: str | Path) -> list[str]:
    """The `exercise-N` tags of `notebook`'s cells, in notebook order."""
    path = Path(notebook)
    return list(_exercise_cells(json.loads(path.read_text(encoding="utf-8")), path))


def read_solutions(path: str | Path) -> dict[str, str]:
    """The blocks of a solution file by name: the code after each `# %% NAME` line, up to the next one.

    Only comments and blank lines may come before the first block; blocks must be named `exercise-N`, once each,
    and hold code.
    """
    path = Path(path)
    if not path.is_file():
        raise SolutionError(f"no solution file {path}: write one `# %% exercise-N` block per exercise cell there")
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        header = _BLOCK.match(line)
        if header:
            name = header.group(1)
            if not EXERCISE_TAG.match(name):
                raise SolutionError(f"{path}:{number}: block {name!r} should be named exercise-N, e.g. exercise-1")
            if name in blocks:
                raise SolutionError(f"{path}:{number}: a second block {name!r}")
            current = blocks[name] = []
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            raise SolutionError(f"{path}:{number}: code before the first `# %% exercise-N` line")
    solved = {name: "\n".join(lines).strip("\n") for name, lines in blocks.items()}
    empty = [name for name, code in solved.items() if not code.strip()]
    if empty:
        raise SolutionError(f"{path}: the blocks {', '.join(empty)} hold no code")
    return solved


def _exercise_cells(nb: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    cells: dict[str, dict[str, Any]] = {}
    for index, cell in enumerate(nb["cells"]):
        for tag in cell.get("metadata", {}).get("tags", []):
            if not EXERCISE_TAG.match(tag):
                continue
            if cell["cell_type"] != "code":
                raise SolutionError(f"{path}: cell {index} is tagged {tag} but is not a code cell")
            if tag in cells:
                raise SolutionError(f"{path}: two cells are tagged {tag}")
            cells[tag] = cell
    return cells
