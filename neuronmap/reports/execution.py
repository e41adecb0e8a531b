"""Running a report template: papermill executes it on this interpreter through a kernelspec written to a temporary
folder (nothing is written into the user's home), and its page is written atomically; a failing cell is named and
the notebook run up to it kept beside the output."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

from ..errors import InputError, ReportError
from .catalog import template_path
from .page import export_html

KERNEL_NAME = "neuronmap-report"
CELL_TIMEOUT_S = 1800


def run_report(template: str, output: str | os.PathLike, parameters: Mapping[str, Any] | None = None, *,
               notebook: str | os.PathLike | None = None) -> Path:
    """Execute `template` with `parameters` (already typed; see `parse_parameters`) and write its HTML to `output`,
    and the executed notebook to `notebook` when given (to open in Jupyter, or to re-run under nbval).

    Each file is written to a temporary name beside it and moved into place, so none is ever half-written. When a
    cell fails, the executed notebook up to that cell is kept at `<output>.partial.ipynb` and a `ReportError`
    names the cell.
    """
    import nbformat
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    source = template_path(template)
    output = Path(output)
    for path in (output, notebook):
        if path is not None and not Path(path).parent.is_dir():
            raise InputError(f"the output's folder {str(Path(path).parent)!r} does not exist")
    partial = output.with_name(output.name + ".partial.ipynb")
    with tempfile.TemporaryDirectory(prefix="neuronmap-report-") as folder, _kernel(Path(folder)):
        executed = Path(folder) / "executed.ipynb"
        try:
            papermill.execute_notebook(
                str(source), str(executed), parameters=dict(parameters or {}), kernel_name=KERNEL_NAME,
                cwd=folder, progress_bar=False, execution_timeout=CELL_TIMEOUT_S, report_mode=False,
            )
        except papermill.PapermillExecutionError as error:
            _keep_partial(executed, partial)
            raise ReportError(_failure(error, partial)) from None
        except (CellTimeoutError, DeadKernelError) as error:
            _keep_partial(executed, partial)
            raise ReportError(f"{type(error).__name__}: {str(error).strip().splitlines()[0]} — the notebook run up to "
                              f"it is kept at {partial}") from None
        ran = nbformat.read(executed, as_version=4)
    ran.metadata["kernelspec"] = STANDARD_KERNELSPEC
    if notebook is not None:
        _write_atomically(Path(notebook), nbformat.writes(ran))
    _write_atomically(output, export_html(ran, title=f"{template} report"))
    partial.unlink(missing_ok=True)
    return output


STANDARD_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
"""The kernel a kept notebook names, so it opens in any Jupyter (the run's own kernelspec was temporary)."""


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _keep_partial(executed: Path, partial: Path) -> None:
    """The executed notebook at `partial`, without the banner cells papermill inserts, so cell numbers match."""
    import nbformat

    if not executed.exists():
        return
    notebook = nbformat.read(executed, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if "papermill-error-cell-tag" not in cell.metadata.get("tags", [])]
    nbformat.write(notebook, executed)
    os.replace(executed, partial)


def _failure(error: Any, partial: Path) -> str:
    first_line = next((line for line in (error.source or "").splitlines() if line.strip()), "")
    message = (str(error.evalue).splitlines() or [""])[0]
    return (f"cell {error.cell_index} failed ({first_line.strip()!r}): {error.ename}: {message} — the notebook run up "
            f"to it is kept at {partial}")


@contextlib.contextmanager
def _kernel(folder: Path) -> Iterator[None]:
    """A kernelspec `KERNEL_NAME` running this interpreter (`sys.executable`), found through JUPYTER_PATH for the
    block; IPython's folder and the kernel's connection files are in `folder` (nothing lands in the user's home), and
    the kernel shows static views (no widgets)."""
    from ipykernel.kernelspec import write_kernel_spec

    spec = folder / "jupyter" / "kernels" / KERNEL_NAME
    write_kernel_spec(str(spec), overrides={
        "display_name": KERNEL_NAME,
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--IPKernelApp.log_level=CRITICAL"],
        "env": {"NEURONMAP_WIDGETS": "0", "PYDEVD_DISABLE_FILE_VALIDATION": "1", **_same_neuronmap()},
    })
    paths = os.pathsep.join(p for p in (str(folder / "jupyter"), os.environ.get("JUPYTER_PATH", "")) if p)
    values = {"JUPYTER_PATH": paths, "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "IPYTHONDIR": str(folder / "ipython")}
    with mock.patch.dict(os.environ, values):  # the standard library's set-and-restore of environment variables
        yield


def _same_neuronmap() -> dict[str, str]:
    """PYTHONPATH for the kernel so it imports this `neuronmap`: needed when it runs from a source tree that is not
    installed (the kernel starts in a temporary folder); an installed copy is found as it is."""
    home = Path(__file__).resolve().parents[2]
    if home.name in ("site-packages", "dist-packages"):
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(home), os.environ.get("PYTHONPATH", "")) if p)}
