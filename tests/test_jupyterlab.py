"""End to end: the attention widget in a real JupyterLab (light and dark themes) and Notebook 7, the circuit graph
and SAE feature browser widgets in JupyterLab, and the static view in a papermill + nbconvert export."""

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

import wcag
from test_browser_attention import assert_fits, highlighted_contrasts, text_contrasts

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
CELLS = [
    "import neuronmap as nm\nmodel = nm.zoo.load('induction-2l')",
    "words = 'bado badu bago bagu bake bali bame bate bati bavi'.split()\n"
    "patterns = nm.attention(model, [' '.join(words * 6), ' '.join(words[:5])])\npatterns",
]
LONG_PROMPT_TOKENS = 61  # a start token and 60 words: wider than any notebook cell on one line
CIRCUIT_CELLS = [
    "import torch\nimport neuronmap as nm\nmodel = nm.zoo.load('induction-2l')",
    "first, other = torch.randint(10, 500, (2, 4, 8), generator=torch.Generator().manual_seed(0))\n"
    "bos = torch.full((4, 1), 2)\n"
    "clean, corrupt = torch.cat([bos, first, first], 1), torch.cat([bos, other, first], 1)\n"
    "metric = lambda logits: logits.log_softmax(-1)[:, 9:-1].gather(-1, clean[:, 10:, None]).mean((1, 2))\n"
    "nm.circuits.eap(model, clean, corrupt, metric)",
]

SAE_CELLS = [
    "import neuronmap as nm\nfrom neuronmap.zoo.recipes import ioi_sae\n"
    "model, sae = nm.zoo.load('ioi'), nm.zoo.load_sae('ioi-resid0')",
    "stats = nm.sae.feature_statistics(sae, model, ioi_sae.texts(200, 3), progress=False)\nstats.browser(n=4)",
]


def notebook(path: Path, sources: list[str] = CELLS) -> Path:
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return path


def environment(home: Path, theme: str = "JupyterLab Light") -> dict[str, str]:
    """Jupyter's data, configuration, runtime and lab settings isolated in `home`, the lab in `theme`; this
    interpreter first on PATH."""
    env = dict(os.environ)
    for variable, folder in {
        "JUPYTER_DATA_DIR": "data", "JUPYTER_CONFIG_DIR": "config", "JUPYTER_RUNTIME_DIR": "runtime", "IPYTHONDIR": "ipython",
        "JUPYTERLAB_SETTINGS_DIR": "settings", "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
    }.items():
        (home / folder).mkdir(parents=True, exist_ok=True)
        env[variable] = str(home / folder)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "themes.jupyterlab-settings").write_text(json.dumps({"theme": theme}))
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
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}


@pytest.fixture(params=[("jupyterlab", "light"), ("jupyterlab", "dark"), ("notebook7", "light")], ids="-".join)
def jupyterlab(request, tmp_path):
    """A JupyterLab (or Notebook 7) server in a theme on 127.0.0.1, random port and token; stops it and only its own
    kernels."""
    front_end, theme = request.param
    (module, *options), route = FRONT_ENDS[front_end]
    port, token = free_port(), secrets.token_hex(16)
    (tmp_path / "notebooks").mkdir()
    notebook(tmp_path / "notebooks" / "attention.ipynb")
    notebook(tmp_path / "notebooks" / "circuit.ipynb", CIRCUIT_CELLS)
    notebook(tmp_path / "notebooks" / "sae.ipynb", SAE_CELLS)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", module, "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path / 'notebooks'}", *options,
        ],
        env=environment(tmp_path / "home", THEMES[theme]), stdout=log, stderr=subprocess.STDOUT,
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
            "circuit_url": f"{base}/{route}/circuit.ipynb?token={token}",
            "sae_url": f"{base}/{route}/sae.ipynb?token={token}",
            "kernels": kernels, "name": f"{front_end}-{theme}", "theme": theme,
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
    dark = page.evaluate("document.body.dataset.jpThemeLight") == "false"
    assert dark == (jupyterlab["theme"] == "dark")
    assert view.locator(".nm-head").count() == 4 and view.locator(".nm-token").count() == LONG_PROMPT_TOKENS
    assert_fits(view, ".jp-OutputArea-output")  # the long prompt wraps inside the cell's output
    view.locator(".nm-head[data-head='2']").click()
    assert view.locator(".nm-head.nm-selected").count() == 2

    seen = []
    for query in (5, 20, 40, 60):
        view.locator(f".nm-token[data-index='{query}']").hover()
        seen += highlighted_contrasts(view)
    assert len(seen) == 4 * LONG_PROMPT_TOKENS and min(ratio for ratio, _ in seen) >= wcag.AA
    assert max(float(item["weight"]) for _, item in seen) > 0.8  # the most-attended tokens were among them

    view.locator(".nm-mode").focus()  # the keyboard: Tab to head 0, Space takes it away and puts it back
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.head") == "0"
    page.keyboard.press("Space")
    assert view.locator(".nm-head[data-head='0']").get_attribute("aria-pressed") == "false"
    page.keyboard.press("Space")
    assert view.locator(".nm-head[data-head='0']").get_attribute("aria-pressed") == "true"
    view.locator(".nm-token[data-index='30']").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")  # the notebook's own arrow and Enter shortcuts must not take these keys
    page.keyboard.press("Enter")  # pins token 32
    assert view.locator(".nm-token[aria-selected='true']").get_attribute("data-index") == "32"
    assert page.locator(".jp-Notebook.jp-mod-editMode").count() == 0
    view.locator(".nm-token[data-index='3']").hover()
    assert "token 32" in view.locator(".nm-info").inner_text()  # the pin holds under the pointer
    for selector in (".nm-bar label", ".nm-info", ".nm-note", ".nm-axis", ".nm-head span", ".nm-token"):
        for ratio, item in text_contrasts(view.locator(selector)):
            assert ratio >= wcag.AA, (selector, ratio, item)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / f"{jupyterlab['name']}-attention-widget.png"))

    view.locator(".nm-layer").select_option("1")  # the kernel sends layer 1 on demand
    page.wait_for_function("document.querySelector('.jp-OutputArea-output .nm-attn').dataset.ready === '1:0'", timeout=30_000)
    view.locator(".nm-prompt").select_option("1")
    page.wait_for_function("document.querySelector('.jp-OutputArea-output .nm-attn').dataset.ready === '1:1'", timeout=30_000)
    assert view.locator(".nm-token").count() == 6
    view.locator(".nm-token[data-index='3']").hover()
    assert view.locator(".nm-token[data-weight]").count() == 6
    assert page.external_requests == []


@pytest.mark.parametrize("jupyterlab", [("jupyterlab", "light")], ids="-".join, indirect=True)
def test_circuit_graph_widget_in_jupyterlab_refilters_and_opens_a_heads_attention(page, jupyterlab):
    """The live graph: edges arrive as binary, the threshold re-filters them in the browser, and clicking a head
    asks the kernel for the attention patterns, which open in the attention viewer inside the graph."""
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(jupyterlab["circuit_url"])
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    wait_for_idle_kernel(page, jupyterlab["api"])
    page.click("text=Run", timeout=10_000)
    page.click('[data-command="runmenu:run-all"]')
    view = page.locator(".jp-OutputArea-output .nm-graphview[data-ready]").first
    view.wait_for(timeout=120_000)
    jupyterlab["kernels"].update(children(jupyterlab["server"].pid))
    assert view.evaluate("el => el.closest('.nm-root') === null")  # the live widget, not the static page
    assert view.locator("path.nm-edge").count() == 100
    view.locator(".nm-threshold").fill("0.05")
    drawn = view.locator("path.nm-edge").count()
    assert 0 < drawn < 100 and view.get_attribute("data-drawn") == str(drawn)
    view.locator('.nm-node[data-id="A1.2"]').click()
    panel = view.locator(".nm-attn-panel .nm-attn[data-ready='1:0']")
    panel.wait_for(timeout=60_000)  # computed in the kernel on this first click, sent as binary
    assert panel.locator(".nm-head.nm-selected").get_attribute("data-head") == "2"
    assert panel.locator(".nm-token").count() == 17
    view.locator('.nm-node[data-id="A0.1"]').click()  # another layer: the attention widget sends it on demand
    view.locator(".nm-attn-panel .nm-attn[data-ready='0:0']").wait_for(timeout=30_000)
    assert "attention of head 0.1" in view.locator(".nm-attn-heading").inner_text()
    assert page.external_requests == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "jupyterlab-circuit-graph-widget.png"))


@pytest.mark.parametrize("jupyterlab", [("jupyterlab", "light")], indirect=True, ids="-".join)
def test_sae_browser_widget_in_jupyterlab_fetches_latents_from_the_kernel(page, jupyterlab):
    """The live feature browser: the list arrives first, a latent the page never had is sent by the kernel when
    clicked, and clicking a token of its contexts lists the latents most active on that token."""
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(jupyterlab["sae_url"])
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    wait_for_idle_kernel(page, jupyterlab["api"])
    page.click("text=Run", timeout=10_000)
    page.click('[data-command="runmenu:run-all"]')
    view = page.locator(".jp-OutputArea-output .nm-sae[data-ready]").first
    view.wait_for(timeout=120_000)
    jupyterlab["kernels"].update(children(jupyterlab["server"].pid))
    assert view.evaluate("el => el.closest('.nm-root') === null")  # the live widget, not the static page
    rows = view.locator(".nm-sae-table tbody tr")
    assert rows.count() > 4
    latent = rows.nth(9).get_attribute("data-latent")  # beyond the 4 a static page would embed
    rows.nth(9).click()
    page.wait_for_selector(f".jp-OutputArea-output .nm-sae[data-ready='{latent}']", timeout=30_000)
    assert view.locator(".nm-sae-context").count() > 0
    view.locator(".nm-sae-context[data-context='0'] .nm-sae-mark").click()
    picked = view.locator(".nm-sae-picked .nm-sae-feature")
    picked.first.wait_for(timeout=10_000)
    assert latent in [picked.nth(i).get_attribute("data-latent") for i in range(picked.count())]
    assert page.external_requests == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "jupyterlab-sae-browser-widget.png"))


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
