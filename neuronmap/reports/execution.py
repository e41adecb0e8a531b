"""Reports: run a template notebook from `notebooks/` with papermill and export it as one standalone HTML page.

The page needs no network: NeuronMap's views are self-contained static HTML, widget views are dropped (their
static fallback stays), and nbconvert's lab template is used without its require.js, MathJax, mermaid and
widget-manager scripts (all loaded from CDNs). The kernel runs this interpreter through a kernelspec written to a
temporary folder, so nothing is written into the user's home. Imported by the `neuronmap report` command only:
papermill and nbconvert are heavy.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, NeuronMapError

KERNEL_NAME = "neuronmap-report"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CELL_TIMEOUT_S = 1800
_PAGE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


class ReportError(NeuronMapError):
    """A report template's cell failed; the message names the cell and where the partial notebook was kept."""


@dataclass(frozen=True)
class Parameter:
    """One parameter a template declares in its `parameters` cell: its default (a Python literal) and help text."""

    name: str
    default: Any
    help: str


def templates_dir() -> Path:
    """Where the templates are: `neuronmap/notebooks` in an installed wheel, the checkout's `notebooks/` otherwise."""
    shipped = Path(__file__).resolve().parent / "notebooks"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def templates() -> dict[str, dict[str, Parameter]]:
    """Every report template by name, with the parameters it declares, in the order it declares them."""
    import papermill

    found = {}
    for path in sorted(templates_dir().glob("*.ipynb")):
        declared = papermill.inspect_notebook(str(path))
        found[path.stem] = {name: Parameter(name, _literal(p["default"]), p["help"]) for name, p in declared.items()}
    return found


def parse_parameters(template: str, pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings as the template's parameters, each value read with the type of its declared default
    (int, float, bool, str, list or dict: lists and dicts as JSON or a Python literal)."""
    declared = _template(template)
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise InputError(f"parameter {pair!r} is not key=value")
        if name not in declared:
            raise InputError(f"template {template!r} has no parameter {name!r}; its parameters: {', '.join(declared)}")
        values[name] = _typed(name, text, declared[name].default)
    return values


def run_report(template: str, output: str | os.PathLike, parameters: Mapping[str, Any] | None = None) -> Path:
    """Execute `template` with `parameters` (already typed; see `parse_parameters`) and write its HTML to `output`.

    Written to a temporary name beside `output` and moved into place, so `output` is never half-written. When a
    cell fails, the executed notebook up to that cell is kept at `<output>.partial.ipynb` and a `ReportError`
    names the cell.
    """
    import nbformat
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    source = templates_dir() / f"{_template_name(template)}.ipynb"
    output = Path(output)
    if not output.parent.is_dir():
        raise InputError(f"the output's folder {str(output.parent)!r} does not exist")
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
        notebook = nbformat.read(executed, as_version=4)
    page = export_html(notebook, title=f"{template} report")
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    return output


def export_html(notebook: Any, *, title: str) -> str:
    """One standalone page of an executed notebook: outputs only (the report's prose and views, not its code),
    widget views replaced by their static HTML, and no script loaded from the network."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            output.get("data", {}).pop(WIDGET_VIEW, None)
    notebook.metadata.pop("widgets", None)
    notebook.metadata["title"] = title
    exporter = HTMLExporter(
        extra_loaders=[DictLoader({"neuronmap_report.html.j2": _PAGE_TEMPLATE})], template_file="neuronmap_report.html.j2",
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    page, _ = exporter.from_notebook_node(notebook)
    return page


def describe() -> str:
    """The templates and their parameters, as `neuronmap report --list` prints them."""
    lines = []
    for name, declared in templates().items():
        lines.append(name)
        for parameter in declared.values():
            shown = json.dumps(parameter.default) if isinstance(parameter.default, (str, list, dict)) else repr(parameter.default)
            lines.append(f"  -p {parameter.name}=…  ({type(parameter.default).__name__}, default {shown})"
                         + (f": {parameter.help}" if parameter.help else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def _template_name(template: str) -> str:
    names = sorted(path.stem for path in templates_dir().glob("*.ipynb"))
    if template not in names:
        raise InputError(f"unknown report template {template!r}; templates: {', '.join(names)}")
    return template


def _template(template: str) -> dict[str, Parameter]:
    _template_name(template)
    return templates()[template]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _typed(name: str, text: str, default: Any) -> Any:
    """`text` read as a value of `default`'s type (any literal when the default is None)."""
    expected = type(default)
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
    else:
        value = _json_or_literal(text)
        if default is None:
            return text if value is _INVALID else value
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is expected:
            return value
    raise InputError(f"parameter {name!r} must be of type {expected.__name__} (its default is {default!r}), got {text!r}")


_INVALID = object()


def _json_or_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _INVALID


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


def _same_neuronmap() -> dict[str, str]:
    """PYTHONPATH for the kernel so it imports this `neuronmap`: needed when it runs from a source tree that is not
    installed (the kernel starts in a temporary folder); an installed copy is found as it is."""
    home = Path(__file__).resolve().parent.parent
    if home.name in ("site-packages", "dist-packages"):
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(home), os.environ.get("PYTHONPATH", "")) if p)}
