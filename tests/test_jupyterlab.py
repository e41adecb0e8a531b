"""End to end: the attention widget in a real JupyterLab, and the static view in a papermill + nbconvert export."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
CELLS = [
    "import neuronmap as nm\nmodel = nm.zoo.load('induction-2l')",
    "words = 'bado badu bago bagu bake bali bame bate bati bavi'.split()\n"
    "patterns = nm.attention(model, [' '.join(words + words), ' '.join(words[:5])])\npatterns",
]


def notebook(path: Path) -> Path:
    cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


def environment(home: Path) -> dict[str, str]:
    """Jupyter's configuration, runtime and lab settings isolated in `home`; this interpreter first on PATH."""
    env = dict(os.environ)
    for variable, folder in {
        "JUPYTER_CONFIG_DIR": "config", "JUPYTER_RUNTIME_DIR": "runtime", "IPYTHONDIR": "ipython",
        "JUPYTERLAB_SETTINGS_DIR": "settings", "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
    }.items():
        (home / folder).mkdir(parents=True, exist_ok=True)
        env[variable] = str(home / folder)
    notification = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.pop("NEURONMAP_WIDGETS", None)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the server's kernels), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


FRONT_ENDS = {
    "jupyterlab": (["jupyterlab", "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"], "lab/tree"),
    "notebook7": (["notebook"], "notebooks"),
}


@pytest.fixture(params=list(FRONT_ENDS))
def jupyterlab(request, tmp_path):
    """A JupyterLab (or Notebook 7) server on 127.0.0.1, random port and token; stops it and only its own kernels."""
    (module, *options), route = FRONT_ENDS[request.param]
    port, token = free_port(), secrets.token_hex(16)
    (tmp_path / "notebooks").mkdir()
    notebook(tmp_path / "notebooks" / "attention.ipynb")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", module, "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path / 'notebooks'}", *options,
        ],
        env=environment(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("JupyterLab did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    kernels: set[int] = set()
    try:
        yield {
            "url": f"{base}/{route}/attention.ipynb?token={token}", "api": (base, token), "server": server,
            "kernels": kernels, "name": request.param,
        }
    finally:
        kernels.update(children(server.pid))
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            server.terminate()
            server.wait(timeout=10)
        for pid in kernels:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.close()


def wait_for_idle_kernel(page, api: tuple[str, str], timeout: float = 60) -> None:
    """Wait until the server has a notebook session whose kernel is idle.

    Waits with `page.wait_for_timeout`, not `time.sleep`: the page's request routing runs in this thread.
    """
    base, token = api
    deadline = time.time() + timeout
    while time.time() < deadline:
        sessions = json.load(urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5))
        if any(session["kernel"]["execution_state"] == "idle" for session in sessions):
            return
        page.wait_for_timeout(500)
    pytest.fail(f"no idle kernel for the notebook: {sessions}")


def test_attention_widget_in_jupyterlab(page, jupyterlab):
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(jupyterlab["url"])
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    wait_for_idle_kernel(page, jupyterlab["api"])  # the page's idle indicator shows before its kernel exists
    page.click("text=Run", timeout=10_000)  # the Run menu ...
    page.click('[data-command="runmenu:run-all"]')  # ... Run All Cells
    view = page.locator(".jp-OutputArea-output .nm-attn").first
    view.wait_for(timeout=90_000)
    page.wait_for_function("document.querySelector('.jp-OutputArea-output .nm-attn')?.dataset.ready === '0:0'", timeout=30_000)
    jupyterlab["kernels"].update(children(jupyterlab["server"].pid))
    assert view.evaluate("el => el.closest('.nm-root') === null")  # the live widget, not the static fallback
    assert view.locator(".nm-head").count() == 4 and view.locator(".nm-token").count() == 21
    view.locator(".nm-head[data-head='2']").click()
    assert view.locator(".nm-head.nm-selected").count() == 2
    view.locator(".nm-layer").select_option("1")  # the kernel sends layer 1 on demand
    page.wait_for_function("document.querySelector('.jp-OutputArea-output .nm-attn').dataset.ready === '1:0'", timeout=30_000)
    view.locator(".nm-prompt").select_option("1")
    page.wait_for_function("document.querySelector('.jp-OutputArea-output .nm-attn').dataset.ready === '1:1'", timeout=30_000)
    assert view.locator(".nm-token").count() == 6
    view.locator(".nm-token[data-index='3']").hover()
    assert view.locator(".nm-token[data-weight]").count() == 6
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{jupyterlab['name']}-attention-widget.png"))
    assert page.external_requests == []


def test_papermill_and_nbconvert_export_shows_the_static_view(page, tmp_path):
    source, executed = notebook(tmp_path / "attention.ipynb"), tmp_path / "executed.ipynb"
    env = environment(tmp_path / "home")
    subprocess.run(
        [sys.executable, "-m", "papermill", "-k", "python3", str(source), str(executed)], env=env, check=True, capture_output=True
    )
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(executed)], env=env, check=True, capture_output=True)
    output = json.loads(executed.read_text())["cells"][1]["outputs"][0]["data"]
    assert "application/vnd.jupyter.widget-view+json" not in output and "text/html" in output
    page.goto((tmp_path / "executed.html").as_uri())
    page.wait_for_selector(".nm-attn[data-ready='0:0']", timeout=20_000)
    assert "Loading widget" not in page.inner_text("body")
    assert page.locator(".nm-attn .nm-head").count() == 4
