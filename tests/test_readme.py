"""The README's quickstart, store, SAE and analysis examples run as written, and print what their comments say they print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = re.compile(r"^print\(.*\)\s+# → (.+?)(?::\s.*)?$")  # `# → value` or `# → value: what it means`


def block(marker: str) -> str:
    """The python block after the `<!-- marker -->` line (indented blocks inside a list item are dedented)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\n( *)```python\n(.+?)\n\1```", readme, re.S)
    return textwrap.dedent(found.group(2))


@pytest.mark.parametrize("marker, prints", [("quickstart", 5), ("store-example", 3), ("sae-example", 4),
                                           ("analysis-example", 4)])
def test_the_readme_examples_run_offline_and_print_what_their_comments_say(tmp_path, marker, prints):
    code = block(marker)
    expected = [m.group(1).strip() for line in code.splitlines() if (m := EXPECTED.match(line.strip()))]
    assert len(expected) >= prints, "the example should show what its prints print"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line.strip() for line in result.stdout.splitlines()]
    assert printed == expected, "\n".join(f"{p!r} vs {e!r}" for p, e in zip(printed, expected) if p != e)


def test_the_readme_explains_the_kernel_warning_papermill_prints():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "Kernel is running over TCP without encryption" in readme and "127.0.0.1" in readme
