"""Reports: the templates in `notebooks/` run with papermill and exported as one standalone HTML page.

`templates()` lists them with their parameters, `parse_parameters` reads `key=value` pairs with the types the
template declares, `run_report` executes one and writes the page (`export_html`), which renders with no network:
NeuronMap's static views, plotly figures drawn by plotly.js embedded once, and no script fetched from a CDN.
Imported by the `neuronmap report` command only: papermill and nbconvert are heavy.
"""

from ..errors import ReportError
from .execution import run_report
from .page import export_html
from .catalog import Parameter, describe, parse_parameters, templates, templates_dir

__all__ = ["Parameter", "ReportError", "describe", "export_html", "parse_parameters", "run_report", "templates", "templates_dir"]
