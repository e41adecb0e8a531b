"""Binder's environment stays in step with the project: torch's CPU build at the constraints' pin, the package
installed under the constraints with the extra that covers every import of every notebook Binder opens, the hub off
at run time, and the README's launch links point at notebooks that exist."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from neuronmap import zoo

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NOTEBOOKS = sorted([*(ROOT / "tutorials").glob("*.ipynb"), *(ROOT / "notebooks").glob("*.ipynb")])
LAUNCH = re.compile(r"https://mybinder\.org/v2/gh/([\w.-]+/[\w.-]+)/HEAD\?urlpath=lab/tree/([\w./-]+)")


def _requirements(path: Path) -> tuple[list[str], dict[str, str]]:
    """(pip options, {name: pinned version}) of a requirements or constraints file."""
    options, pins = [], {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-"):
            options.append(line)
        elif line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return options, pins


def test_binder_installs_torch_alone_at_the_constraints_pin_from_the_cpu_index():
    options, pins = _requirements(BINDER / "requirements.txt")
    assert pins == _requirements(ROOT / "constraints.txt")[1] == {"torch": "2.13.0"}
    assert options == [f"--index-url {CPU_INDEX}"]  # only torch comes from PyTorch's index, and only its CPU build


def test_postbuild_installs_the_package_under_the_constraints_and_proves_every_model_loads_offline():
    script = (BINDER / "postBuild").read_text()
    assert os.access(BINDER / "postBuild", os.X_OK) and script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert 'pip install --no-cache-dir -c constraints.txt -e ".[notebook]"' in script
    assert "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python" in script
    loaded = ast.literal_eval(re.search(r"for name in (\(.*?\)):", script).group(1))
    assert set(loaded) == set(zoo.NAMES)


def test_start_keeps_the_hub_off_at_run_time():
    script = (BINDER / "start").read_text()
    assert os.access(BINDER / "start", os.X_OK)
    assert "export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in script and script.rstrip().endswith('exec "$@"')
    assert (BINDER / "runtime.txt").read_text().strip() == f"python-{sys.version_info.major}.{sys.version_info.minor}"


def _imports(notebook: Path) -> set[str]:
    found = set()
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            source = "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found


def _installed_by(requirements: list[str]) -> set[str]:
    """The distributions `requirements` pull in, transitively (as installed here), lower-cased."""
    seen, todo = set(), [re.split(r"[<>=\[; ]", r, maxsplit=1)[0] for r in requirements]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=\[; (]", r, maxsplit=1)[0] for r in needs if "extra ==" not in r]
    return seen


def test_the_notebook_extra_covers_every_import_of_every_notebook_binder_opens():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = [r for r in project["optional-dependencies"]["notebook"] if not r.startswith("neuronmap")]
    extra += project["optional-dependencies"]["minilm"]
    installed = _installed_by([*project["dependencies"], *extra])
    providers = importlib.metadata.packages_distributions()
    imported = set().union(*(_imports(path) for path in NOTEBOOKS)) - set(sys.stdlib_module_names) - {"neuronmap"}
    assert imported >= {"torch", "numpy", "IPython"}  # the parse found the notebooks' imports
    missing = {module for module in imported if not {d.lower() for d in providers.get(module, [])} & installed}
    assert not missing, f"notebooks import {sorted(missing)}, which the notebook extra does not install"


def test_the_readme_has_a_binder_badge_and_launch_links_to_notebooks_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    slug = repository.removeprefix("https://github.com/")
    assert "https://mybinder.org/badge_logo.svg" in readme
    links = LAUNCH.findall(readme)
    assert links and {found_slug for found_slug, _ in links} == {slug}
    for _, path in links:
        assert (ROOT / path).is_file(), f"the README launches {path}, which does not exist"
    launched = {path for _, path in links}
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "tutorials").glob("*.ipynb")} <= launched  # every tutorial


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_binder_notebooks_name_an_ordinary_kernel(notebook):
    """Binder opens a notebook with the kernel its metadata names; a temporary test kernel would not exist there."""
    kernel = json.loads(notebook.read_text(encoding="utf-8"))["metadata"].get("kernelspec", {})
    assert kernel.get("name", "python3") == "python3"
