"""The README's quickstart runs as written, and prints what its comments say it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = re.compile(r"^print\(.*\)\s+# → (.+?)(?::\s.*)?$")  # `# → value` or `# → value: what it means`


def quickstart() -> str:
    """The python block after the `<!-- quickstart -->` marker."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"<!-- quickstart -->\n```python\n(.+?)\n```", readme, re.S).group(1)


def test_the_quickstart_runs_offline_and_prints_what_its_comments_say(tmp_path):
    code = quickstart()
    expected = [m.group(1).strip() for line in code.splitlines() if (m := EXPECTED.match(line.strip()))]
    assert len(expected) >= 5, "the quickstart should show what its prints print"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line.strip() for line in result.stdout.splitlines()]
    assert printed == expected, "\n".join(f"{p!r} vs {e!r}" for p, e in zip(printed, expected) if p != e)


def test_the_readme_explains_the_kernel_warning_papermill_prints():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "Kernel is running over TCP without encryption" in readme and "127.0.0.1" in readme
