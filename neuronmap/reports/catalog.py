"""The report templates: notebooks in `notebooks/` whose `parameters` cell declares each parameter as
`name = default  # help`; their listing, and `key=value` pairs read with the type of each declared default."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class Parameter:
    """One parameter a template declares in its `parameters` cell: its default (a Python literal) and help text."""

    name: str
    default: Any
    help: str


def templates_dir() -> Path:
    """Where the templates are: `neuronmap/notebooks` in an installed wheel, the checkout's `notebooks/` otherwise."""
    package = Path(__file__).resolve().parent.parent
    shipped = package / "notebooks"
    return shipped if shipped.is_dir() else package.parent / "notebooks"


def templates() -> dict[str, dict[str, Parameter]]:
    """Every report template by name, with the parameters it declares, in the order it declares them."""
    return {path.stem: _declared(path) for path in sorted(templates_dir().glob("*.ipynb"))}


def template_path(template: str) -> Path:
    """The notebook of the template called `template`; an unknown name lists the valid ones."""
    names = sorted(path.stem for path in templates_dir().glob("*.ipynb"))
    if template not in names:
        raise InputError(f"unknown report template {template!r}; templates: {', '.join(names)}")
    return templates_dir() / f"{template}.ipynb"


def parse_parameters(template: str, pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings as the template's parameters, each value read with the type of its declared default
    (int, float, bool, str, list or dict: lists and dicts as JSON or a Python literal)."""
    declared = _declared(template_path(template))
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise InputError(f"parameter {pair!r} is not key=value")
        if name not in declared:
            raise InputError(f"template {template!r} has no parameter {name!r}; its parameters: {', '.join(declared)}")
        values[name] = _typed(name, text, declared[name].default)
    return values


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


def _declared(path: Path) -> dict[str, Parameter]:
    import papermill

    return {name: Parameter(name, _literal(p["default"]), p["help"]) for name, p in papermill.inspect_notebook(str(path)).items()}


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
