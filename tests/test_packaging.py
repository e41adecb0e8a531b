"""The set-up files agree with each other: Binder's pins, the constraints file, the README and CI."""

from __future__ import annotations

import re
import subprocess
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
    assert '-c constraints.txt -e ".[dev]"' in post_build


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
