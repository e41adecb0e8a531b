"""The notebook suite: every tutorial runs under papermill, and its committed outputs pass nbval.

Each notebook in `tutorials/` (picked up by glob) is
1. executed with papermill into a temporary folder (the exercises' solutions run, errors fail the test), and
2. re-run by nbval, which compares every cell's output with the output committed in the notebook, after the
   substitutions in `tests/nbval_sanitize.cfg` (addresses, temporary paths, timings: never whole outputs).

So tutorials are committed executed. After changing a tutorial, or library code whose output it shows,
regenerate the committed outputs (executes with papermill, then drops papermill's timestamps and paths):

    python tests/test_notebooks.py                                   # every tutorial
    python tests/test_notebooks.py tutorials/01_capture_and_intervene.ipynb

Both the tests and the regeneration run the notebooks on this interpreter (`sys.executable`) through a
kernelspec written to a temporary folder, so they work in any fresh virtual environment with ipykernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")
KERNEL_NAME = "neuronmap-notebooks"
STANDARD_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def notebook_env() -> Iterator[dict[str, str]]:
    """Environment in which papermill and nbval find a kernel running this interpreter and this checkout."""
    with _kernel_environment() as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield env


def test_the_tutorials_are_found():
    assert TUTORIALS, f"no notebooks in {ROOT / 'tutorials'}"


def test_the_notebook_kernel_runs_this_interpreter(notebook_env):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable


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
def test_notebook_executes_with_papermill(notebook: Path, notebook_env, tmp_path: Path):
    import papermill

    output = tmp_path / notebook.name
    papermill.execute_notebook(
        str(notebook),
        str(output),
        kernel_name=KERNEL_NAME,
        cwd=str(notebook.parent),
        progress_bar=False,
        execution_timeout=CELL_TIMEOUT_S,
    )
    assert output.exists()


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_notebook_outputs_match_with_nbval(notebook: Path, notebook_env):
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", str(notebook),
            "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
            "--nbval-cell-timeout", str(CELL_TIMEOUT_S),
            "-p", "no:cacheprovider", "-o", "addopts=", "-q", "--no-header",
        ],
        cwd=ROOT,
        env={**os.environ, **notebook_env},
        capture_output=True,
        text=True,
        timeout=CELL_TIMEOUT_S * 2,
    )
    assert result.returncode == 0, (
        f"nbval found outputs of {notebook.name} that differ from the committed ones (or a failing cell). If the "
        f"change is intended, regenerate with `python tests/test_notebooks.py {notebook.relative_to(ROOT)}`.\n"
        f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    )


# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _kernel_environment() -> Iterator[dict[str, str]]:
    """A temporary kernelspec `KERNEL_NAME` that runs `sys.executable`, and environment variables that find it.

    The checkout goes first on PYTHONPATH so the kernel imports this `neuronmap` even when it is not installed;
    the model hub is switched off (tutorials use models shipped in installed packages).
    """
    from ipykernel.kernelspec import write_kernel_spec

    with tempfile.TemporaryDirectory(prefix="neuronmap-kernels-") as folder:
        write_kernel_spec(os.path.join(folder, "kernels", KERNEL_NAME), overrides={"display_name": KERNEL_NAME})
        python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        jupyter_path = os.pathsep.join(p for p in (folder, os.environ.get("JUPYTER_PATH", "")) if p)
        yield {
            "JUPYTER_PATH": jupyter_path,
            "PYTHONPATH": python_path,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }


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

    with _kernel_environment() as env, _environ(env), tempfile.TemporaryDirectory() as folder:
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
    nbformat.write(nb, notebook)
    leaks = _absolute_paths(notebook.read_text(encoding="utf-8"))
    if leaks:
        raise SystemExit(f"{notebook} now stores local paths {sorted(set(leaks))}: keep them out of its outputs")


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    for path in [Path(arg).resolve() for arg in sys.argv[1:]] or TUTORIALS:
        print(f"executing {path.relative_to(ROOT)}", flush=True)
        regenerate(path)
