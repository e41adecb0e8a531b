"""The notebook suite: every tutorial is a student copy that runs, and a solved copy whose checkers all pass.

The tutorials are committed as student copies: each exercise cell (tagged `exercise-N`) holds a placeholder
(`answer = ...`), and the checker below it says "✗ Not yet". Their solutions live in `tutorials/solutions/`, and
`neuronmap.course.solve` writes the solved copy. For each notebook in `tutorials/` (picked up by glob):
1. the committed student copy is executed top to bottom, with no local paths, and every checker in it says
   "✗ Not yet: replace the `...`", one per exercise;
2. nbval re-runs it and compares every cell's output with the committed one, after the substitutions in
   `tests/nbval_sanitize.cfg` (addresses, temporary paths, timings: never whole outputs), so the student copy
   still runs and its checkers still say "not yet", without an error;
3. its solved copy is executed with papermill: every checker says "✓ Correct", one per exercise, and every
   number that a checker or a prose cell states is one the notebook's code printed (so they cannot disagree).

After changing a tutorial, or library code whose output it shows, regenerate the committed outputs of the
student copy (executes with papermill, then drops papermill's timestamps and paths):

    python tests/test_notebooks.py                                   # every tutorial
    python tests/test_notebooks.py tutorials/01_capture_and_intervene.ipynb

Both the tests and the regeneration run the notebooks on this interpreter (`sys.executable`) through a
kernelspec written to a temporary folder, so they work in any fresh virtual environment with ipykernel. Jupyter's
and IPython's data, configuration and runtime folders are in that temporary folder too, so no run writes into
the user's home (`~/.local/share/jupyter`, `~/.ipython`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import environ
from neuronmap.course import solve
from neuronmap.course.feedback import PLACEHOLDER_HINT
from neuronmap.course.solutions import exercise_tags

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")
KERNEL_NAME = "neuronmap-notebooks"
STANDARD_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
CELL_TIMEOUT_S = 600
ISOLATED = ("JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")
CHECKER_LINE = re.compile(r"^(?:✓ Correct|✗ Not yet): .*$", re.MULTILINE)
MEASURED = re.compile(r"(?<![\w.])\d+\.\d{2,}(?!\w|\.\d)")  # a measured number such as 0.93 (not a head name such as 1.2)


@pytest.fixture(scope="module")
def notebook_env() -> Iterator[dict[str, str]]:
    """Environment in which papermill and nbval find a kernel running this interpreter and this checkout."""
    with _kernel_environment() as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env


@pytest.fixture(scope="module")
def solved_run(notebook_env, tmp_path_factory) -> Callable[[Path], dict]:
    """The solved copy of a tutorial, executed with papermill (once per notebook), as notebook JSON."""
    import papermill

    runs: dict[Path, dict] = {}

    def run(notebook: Path) -> dict:
        if notebook not in runs:
            folder = tmp_path_factory.mktemp("solved")
            solved = solve(notebook, folder / f"solved-{notebook.name}")
            executed = folder / notebook.name
            papermill.execute_notebook(
                str(solved), str(executed), kernel_name=KERNEL_NAME, cwd=str(notebook.parent),
                progress_bar=False, execution_timeout=CELL_TIMEOUT_S,
            )
            runs[notebook] = json.loads(executed.read_text(encoding="utf-8"))
        return runs[notebook]

    return run


def test_the_tutorials_are_found():
    assert TUTORIALS, f"no notebooks in {ROOT / 'tutorials'}"


def test_the_notebook_kernel_runs_this_interpreter(notebook_env):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable


def test_a_notebook_run_writes_nothing_into_home(tmp_path: Path):
    """papermill and nbval in `_kernel_environment` alone (as the regeneration runs, outside pytest's session
    isolation), with HOME pointing at an empty folder, leave it empty: no connection files, no IPython history."""
    home, notebook, executed = tmp_path / "home", tmp_path / "tiny.ipynb", tmp_path / "executed.ipynb"
    home.mkdir()
    cell = {"cell_type": "code", "execution_count": None, "id": "c0", "metadata": {}, "outputs": [], "source": ["print(1 + 1)"]}
    notebook.write_text(json.dumps({"cells": [cell], "metadata": {"kernelspec": dict(STANDARD_KERNELSPEC)}, "nbformat": 4, "nbformat_minor": 5}))
    with _kernel_environment() as env:
        inherited = {key: value for key, value in os.environ.items() if key not in ISOLATED}
        run_env = {**inherited, **env, "HOME": str(home)}
        for command in (
            [sys.executable, "-m", "papermill", "-k", KERNEL_NAME, "--no-progress-bar", str(notebook), str(executed)],
            [sys.executable, "-m", "pytest", str(executed), "--nbval", "--nbval-current-env", "-p", "no:cacheprovider", "-o", "addopts=", "-q"],
        ):
            result = subprocess.run(command, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=CELL_TIMEOUT_S)
            assert result.returncode == 0, f"{command}\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    written = sorted(str(path.relative_to(home)) for path in home.rglob("*"))
    assert written == [], f"a notebook run wrote into the home folder: {written}"


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_committed_notebook_is_executed_and_clean(notebook: Path):
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{notebook.name} is not committed as executed top to bottom (execution counts {counts}); "
        f"regenerate it with `python tests/test_notebooks.py {notebook.relative_to(ROOT)}`"
    )
    assert any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in code), (
        f"{notebook.name} has no cell tagged 'parameters' for papermill"
    )
    assert not any(cell["outputs"] and cell["outputs"][0].get("output_type") == "error" for cell in code)
    leaks = sorted({hit for hit in _absolute_paths(json.dumps(nb))})
    assert not leaks, f"{notebook.name} stores local paths: {leaks}"


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_committed_notebook_is_the_student_copy(notebook: Path, tmp_path: Path):
    """Every exercise cell holds a placeholder, has a solution, and its checker says "not yet" without error."""
    tags = exercise_tags(notebook)
    assert tags, f"{notebook.name} has no exercise cells (tagged exercise-N)"
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if set(cell.get("metadata", {}).get("tags", [])) & set(tags):
            assert "...  # YOUR ANSWER" in "".join(cell["source"]), f"an exercise cell of {notebook.name} is not a placeholder"
    solve(notebook, tmp_path / notebook.name)  # raises unless tags and solution blocks match one to one
    lines = _checker_lines(nb)
    assert len(lines) == len(tags), f"{len(lines)} checker lines for {len(tags)} exercises: {lines}"
    assert all(line.startswith(f"✗ Not yet: {PLACEHOLDER_HINT}") for line in lines), lines


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_solved_notebook_passes_every_checker(notebook: Path, solved_run):
    lines = _checker_lines(solved_run(notebook))
    assert len(lines) == len(exercise_tags(notebook)), lines
    assert all(line.startswith("✓ Correct: ") for line in lines), lines


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_numbers_in_prose_and_checkers_are_ones_the_notebook_printed(notebook: Path, solved_run):
    unprinted = _unprinted_numbers(solved_run(notebook))
    assert not unprinted, f"{notebook.name} states numbers that its code did not print there:\n" + "\n".join(unprinted)


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_notebook_outputs_match_with_nbval(notebook: Path, notebook_env):
    result = run_nbval(notebook, notebook_env, cwd=ROOT)
    assert result.returncode == 0, (
        f"nbval found outputs of {notebook.name} that differ from the committed ones (or a failing cell). If the "
        f"change is intended, regenerate with `python tests/test_notebooks.py {notebook.relative_to(ROOT)}`.\n"
        f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    )


# ---------------------------------------------------------------------------------------------------------------


def run_nbval(notebook: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """nbval re-running `notebook` on this interpreter and comparing every output with the stored one, after the
    substitutions in `SANITIZE`; `env` (from `_kernel_environment`) is added to this process's environment."""
    return subprocess.run(
        [
            sys.executable, "-m", "pytest", str(notebook),
            "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
            "--nbval-cell-timeout", str(CELL_TIMEOUT_S),
            "-p", "no:cacheprovider", "-o", "addopts=", "-q", "--no-header",
        ],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CELL_TIMEOUT_S * 2,
    )


@contextlib.contextmanager
def _kernel_environment() -> Iterator[dict[str, str]]:
    """A temporary kernelspec `KERNEL_NAME` that runs `sys.executable`, and environment variables that find it.

    Jupyter's data (where the kernelspec is, and `nbsignatures.db`), configuration and runtime (connection files)
    folders and IPython's (history) are all in the temporary folder, so nothing is written into the user's home.
    The checkout goes first on PYTHONPATH so the kernel imports this `neuronmap` even when it is not installed;
    the model hub is switched off (tutorials use models shipped in installed packages).
    """
    from ipykernel.kernelspec import write_kernel_spec

    with tempfile.TemporaryDirectory(prefix="neuronmap-kernels-") as folder:
        isolated = {key: os.path.join(folder, key.lower()) for key in ISOLATED}
        write_kernel_spec(os.path.join(isolated["JUPYTER_DATA_DIR"], "kernels", KERNEL_NAME), overrides={"display_name": KERNEL_NAME})
        python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        yield {
            **isolated,
            "PYTHONPATH": python_path,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }


def _checker_lines(nb: dict) -> list[str]:
    """Every ✓/✗ line that a checker printed, in notebook order."""
    return [line for text in _output_texts(nb) for line in CHECKER_LINE.findall(text)]


def _output_texts(nb: dict) -> list[str]:
    """The text of every code cell's printed and plain-text outputs (not HTML), in notebook order."""
    return [text for cell in nb["cells"] for text in _cell_texts(cell)]


def _cell_texts(cell: dict) -> list[str]:
    texts = []
    for output in cell.get("outputs", []):
        text = output.get("text") if output["output_type"] == "stream" else output.get("data", {}).get("text/plain")
        if text:
            texts.append("".join(text))
    return texts


def _unprinted_numbers(nb: dict) -> list[str]:
    """Measured numbers stated by a checker or a prose cell that the code around them did not print.

    A checker's numbers must have been printed since the previous checker line (in the cells of its exercise); a
    prose cell's, by the code cells between the markdown cells before and after it.
    """
    unprinted: list[str] = []
    since_check: list[str] = []
    sections: list[tuple[list[str], list[str]]] = [([], [])]  # (prose lines, output lines) between markdown cells
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            sections.append(("".join(cell["source"]).splitlines(), []))
            continue
        for line in "\n".join(_cell_texts(cell)).splitlines():
            if CHECKER_LINE.match(line):
                printed = set(MEASURED.findall("\n".join(since_check)))
                unprinted += [f"{number} in {line!r}" for number in MEASURED.findall(line) if number not in printed]
                since_check = []
            else:
                since_check.append(line)
                sections[-1][1].append(line)
    for (_, before), (prose, after) in zip(sections, sections[1:]):
        printed = set(MEASURED.findall("\n".join(before + after)))
        unprinted += [f"{number} in {line!r}" for line in prose for number in MEASURED.findall(line) if number not in printed]
    return unprinted


def _absolute_paths(text: str) -> list[str]:
    """Local absolute paths in a notebook's JSON: this checkout, the home folder, temporary folders, site-packages."""
    needles = {str(ROOT), str(Path.home()), tempfile.gettempdir()}
    hits = [needle for needle in needles if len(needle) > 1 and needle in text]
    hits += re.findall(r"[^\s\"'<>]*/(?:site|dist)-packages/", text)
    return hits


def regenerate(notebook: Path) -> None:
    """Execute `notebook` in place with papermill and strip what papermill records about this machine and run."""
    import nbformat
    import papermill

    with _kernel_environment() as env, environ(env), tempfile.TemporaryDirectory() as folder:
        executed = Path(folder) / notebook.name
        papermill.execute_notebook(
            str(notebook), str(executed), kernel_name=KERNEL_NAME, cwd=str(notebook.parent), progress_bar=False
        )
        nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("papermill", None)
    nb.metadata["kernelspec"] = dict(STANDARD_KERNELSPEC)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
        if cell.cell_type == "code":
            cell.outputs = _coalesced(cell.outputs)
    nbformat.write(nb, notebook)
    leaks = _absolute_paths(notebook.read_text(encoding="utf-8"))
    if leaks:
        raise SystemExit(f"{notebook} now stores local paths {sorted(set(leaks))}: keep them out of its outputs")


def _coalesced(outputs: list) -> list:
    """`outputs` with consecutive stream outputs to the same stream joined, as a terminal shows them: how the
    kernel split a cell's prints into messages depends on timing, and the committed copy should not."""
    joined: list = []
    for output in outputs:
        previous = joined[-1] if joined else None
        if output.output_type == "stream" and previous is not None and previous.output_type == "stream" and previous.name == output.name:
            previous.text += output.text
        else:
            joined.append(output)
    return joined


if __name__ == "__main__":
    for path in [Path(arg).resolve() for arg in sys.argv[1:]] or TUTORIALS:
        print(f"executing {path.relative_to(ROOT)}", flush=True)
        regenerate(path)
