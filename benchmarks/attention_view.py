"""Browser benchmark: what four attention viewers cost in headless Chromium, on the same attention data.

Run from the repository root (on demand; this is not a test)::

    .bench-venv/bin/python benchmarks/attention_view.py                       # N = 128 512 1024, 3 repeats
    .bench-venv/bin/python benchmarks/attention_view.py --sizes 128 --repeats 1   # quick look
    .bench-venv/bin/python benchmarks/attention_view.py --help

Needs, in the same environment: neuronmap with anywidget, playwright (the Python package only: it drives the
system's Chromium at --chromium, no browser download), bertviz and circuitsvis. A peer that is not installed
is reported as not run. Nothing needs the internet except, once, ``npm pack`` of bertviz's three CDN scripts
(see below), which are cached in --vendor-dir.

Data: a randomly initialised GPT-2-sized model (``GPT2Config(n_layer=12, n_head=12, n_embd=768,
n_positions=1024)``, seed 0), random token ids (seed 0), N tokens, no tokenizer (tokens show as their ids).
``nm.attention`` gives every layer's patterns; each viewer gets those same float32 tensors:

* ``nm-widget``   the live anywidget (``patterns.widget(layer=0, heads=[0])``). Without a Jupyter server, a
  harness page (not counted) imports the widget's ES module and CSS and fetches its synced traits -- ``thumbs``
  and ``detail`` as binary, the rest as JSON -- then calls ``render`` with a minimal fake anywidget model
  (``get`` returns the traits, Bytes traits as ``DataView``s, as anywidget delivers them; ``set``,
  ``save_changes``, ``on``, ``off`` do nothing). Every layer's thumbnails and layer 0's full patterns are sent.
* ``nm-static``   ``patterns._repr_html_()`` in a page of its own.
* ``bertviz``     ``head_view(..., html_action="return")``: all 12 layers, all heads, as bertviz users call it.
  Its page loads require.js, d3 5.7.0 and jQuery 2.0.0 from cdnjs; those requests are answered (and counted)
  with local copies from the npm registry: requirejs@2.3.6 ``require.js`` (unminified, ~70 KB more than the
  CDN's ``require.min.js``), d3@5.7.0 ``dist/d3.min.js`` and jquery@2.1.0 ``dist/jquery.min.js`` (2.0.0 is
  not on npm). Every other request to another host is aborted and listed.
* ``circuitsvis`` ``attention.attention_heads(patterns[0][0], tokens).local_src``: one layer, as CircuitsVis
  users do, with its bundled JavaScript inline (what it shows offline; the CDN variant needs unpkg).

Pages are served from a local HTTP server on 127.0.0.1; a fresh browser (fresh profile, empty cache) loads each
page. Measured per page:

* bytes sent before first paint: body bytes the server sent plus the bertviz scripts answered locally (exact,
  CPU-independent; everything the page loads is needed before it paints). For the widget: the JS and CSS, the
  JSON of the non-binary traits, ``thumbs`` and ``detail``;
* time to first paint: ``performance.now()`` (milliseconds since navigation start) in the animation frame after
  the first frame in which the view's main element exists -- the frame that shows it has been laid out and
  painted by then. Main element: ours ``.nm-attn[data-ready]`` (set once the first layer is decoded and
  drawn); bertviz an ``svg`` in its ``#vis`` with at least one attention ``line`` and non-zero width;
  CircuitsVis all n_heads + 1 ``canvas`` elements (head thumbnails and the zoomed head) with non-zero width;
* JS heap: CDP ``Performance.getMetrics`` ``JSHeapUsedSize`` right after first paint, and again after a forced
  garbage collection (what the view keeps);
* Python-side preparation time (one call; secondary): ``widget()`` construction, ``_repr_html_()``, the peers'
  HTML generation. Shared work (the forward pass) is not counted.

Repeats are interleaved (each round visits every size and viewer, starting at the next viewer); times and heaps
are medians over repeats. A page that does not paint within --timeout seconds is reported as timed out and not
retried. A peer page whose predicted size exceeds --max-page-mb is neither written nor loaded: "not run (size)"
with the prediction (the JSON of the attention, estimated from 4096 random rows, plus the peer's JavaScript;
bertviz writes its JSON twice, because its template's marker also appears in a comment). Times depend on the
machine (its CPU count is printed with the results); byte counts do not. MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
from statistics import median
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

N_LAYER = N_HEAD = 12
VIEWERS = ("nm-widget", "nm-static", "bertviz", "circuitsvis")
OURS = ("nm-widget", "nm-static")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
HARNESS = "harness.html"
"""Pages with this name stand in for Jupyter and are not counted as bytes sent."""
PAGE_HEAD = '<!doctype html><meta charset="utf-8"><body>'
BERTVIZ_CDN = {
    # file name the page requests -> (npm package, file inside its tarball)
    "require.min.js": ("requirejs@2.3.6", "package/require.js"),
    "d3.min.js": ("d3@5.7.0", "package/dist/d3.min.js"),
    "jquery.min.js": ("jquery@2.1.0", "package/dist/jquery.min.js"),
}
READY = {
    "nm-widget": "() => document.querySelector('.nm-attn[data-ready]')",
    "nm-static": "() => document.querySelector('.nm-attn[data-ready]')",
    "bertviz": (
        "() => { const svg = document.querySelector('[id^=\"bertviz-\"] #vis svg');"
        " return svg && svg.querySelector('line') && svg.getBoundingClientRect().width > 0; }"
    ),
    "circuitsvis": (
        "() => { const canvases = [...document.querySelectorAll('[id^=\"circuits-vis-\"] canvas')];"
        f" return canvases.length >= {N_HEAD + 1} && canvases.every((c) => c.getBoundingClientRect().width > 0); }}"
    ),
}
# After the first frame in which the view exists, the next frame's callback records the time: by then the
# frame that shows the view has been laid out and painted.
PAINT_PROBE = """(() => {
  const ready = %s;
  const poll = () => {
    let done = false;
    try { done = Boolean(ready()); } catch (error) {}
    if (done) requestAnimationFrame(() => { window.__nmFirstPaint = performance.now(); });
    else requestAnimationFrame(poll);
  };
  requestAnimationFrame(poll);
})();"""
WIDGET_HARNESS = """<!doctype html><meta charset="utf-8"><link rel="stylesheet" href="attention.css"><body>
<div id="view"></div>
<script type="module">
import widget from "./attention.js";
const [traits, thumbs, detail] = await Promise.all([
  fetch("traits.json").then((r) => r.json()),
  fetch("thumbs.bin").then((r) => r.arrayBuffer()),
  fetch("detail.bin").then((r) => r.arrayBuffer()),
]);
const values = { ...traits, thumbs: new DataView(thumbs), detail: new DataView(detail) };
const model = { get: (name) => values[name], set() {}, save_changes() {}, on() {}, off() {} };
widget.render({ model, el: document.getElementById("view") });
</script>"""


@dataclass
class Page:
    """One viewer's page for one size, or why there is none."""

    viewer: str
    n: int
    path: str | None = None
    prep_s: float | None = None
    status: str = "ok"


@dataclass
class Cell:
    """Every measurement of one viewer at one size."""

    page: Page
    sent: int | None = None
    paint_ms: list[float] = field(default_factory=list)
    heap_mb: list[float] = field(default_factory=list)
    kept_mb: list[float] = field(default_factory=list)
    status: str = "ok"
    blocked: set[str] = field(default_factory=set)

    @property
    def finished(self) -> bool:
        return self.status == "ok" and bool(self.paint_ms)


# ---------------------------------------------------------------- data


def build_patterns(n: int):
    """Every layer's attention patterns of the random GPT-2-sized model on `n` random tokens."""
    import neuronmap as nm
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=768, n_positions=1024)
    model = nm.load(GPT2LMHeadModel(config).eval())
    ids = torch.randint(config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    return nm.attention(model, ids)


def timed(make: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = make()
    return result, time.perf_counter() - start


def predicted_json_chars(values: torch.Tensor) -> int:
    """About how long `json.dumps(values.tolist())` is, from 4096 rows drawn at random."""
    rows = values.reshape(-1, values.shape[-1])
    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:4096]]
    per_row = sum(len(json.dumps(row)) + 2 for row in sample.tolist()) / len(sample)
    return round(per_row * len(rows))


# ---------------------------------------------------------------- pages


def write_ours(patterns, n: int, root: Path) -> list[Page]:
    """The live widget's payload with its harness page, and the static view's page."""
    import anywidget

    widget, widget_s = timed(lambda: patterns.widget(layer=0, heads=[0]))
    folder = root / str(n) / "nm-widget"
    folder.mkdir(parents=True)
    binary = {"thumbs", "detail"}
    names = set(widget.traits(sync=True)) - set(anywidget.AnyWidget.class_traits(sync=True)) - binary
    traits = {name: getattr(widget, name) for name in sorted(names) if not name.startswith("_")}
    (folder / "traits.json").write_text(json.dumps(traits), encoding="utf-8")
    (folder / "thumbs.bin").write_bytes(widget.thumbs)
    (folder / "detail.bin").write_bytes(widget.detail)
    (folder / "attention.js").write_text(widget._esm, encoding="utf-8")
    (folder / "attention.css").write_text(widget._css, encoding="utf-8")
    (folder / HARNESS).write_text(WIDGET_HARNESS, encoding="utf-8")
    html, static_s = timed(patterns._repr_html_)
    write_page(root, n, "nm-static", PAGE_HEAD + html)
    return [
        Page("nm-widget", n, f"/{n}/nm-widget/{HARNESS}", widget_s),
        Page("nm-static", n, f"/{n}/nm-static/index.html", static_s),
    ]


def write_bertviz(patterns, n: int, root: Path, max_bytes: int, scripts_ready: bool) -> Page:
    try:
        import bertviz
    except ImportError:
        return Page("bertviz", n, status="not run (not installed)")
    if not scripts_ready:
        return Page("bertviz", n, status="not run (no offline copy of its CDN scripts)")
    layers = [patterns[layer] for layer in patterns.layers]
    tokens = patterns.str_tokens[0]
    template = (Path(bertviz.__file__).parent / "head_view.js").read_text(encoding="utf-8")
    # head_view.js names its PYTHON_PARAMS marker in a comment too, so the data lands in the page twice
    copies = template.count("PYTHON_PARAMS")
    predicted = len(template) + copies * (predicted_json_chars(torch.stack(layers)) + 2 * len(json.dumps(tokens)))
    if predicted > max_bytes:
        return Page("bertviz", n, status=f"not run (size: predicted {predicted / 1e6:,.0f} MB)")
    html, seconds = timed(lambda: bertviz.head_view(layers, tokens, html_action="return").data)
    return Page("bertviz", n, write_page(root, n, "bertviz", PAGE_HEAD + html), seconds)


def write_circuitsvis(patterns, n: int, root: Path, max_bytes: int) -> Page:
    try:
        import circuitsvis
    except ImportError:
        return Page("circuitsvis", n, status="not run (not installed)")
    heads = patterns[patterns.layers[0]][0]
    tokens = patterns.str_tokens[0]
    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    predicted = predicted_json_chars(heads) + bundle.stat().st_size + len(json.dumps(tokens))
    if predicted > max_bytes:
        return Page("circuitsvis", n, status=f"not run (size: predicted {predicted / 1e6:,.0f} MB)")
    html, seconds = timed(lambda: circuitsvis.attention.attention_heads(attention=heads, tokens=tokens).local_src)
    return Page("circuitsvis", n, write_page(root, n, "circuitsvis", PAGE_HEAD + html), seconds)


def write_page(root: Path, n: int, viewer: str, html: str) -> str:
    folder = root / str(n) / viewer
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(html, encoding="utf-8")
    return f"/{n}/{viewer}/index.html"


def bertviz_scripts(cache: Path) -> dict[str, bytes] | None:
    """bertviz's CDN scripts by requested file name, from `npm pack` tarballs cached in `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    scripts = {}
    for name, (package, member) in BERTVIZ_CDN.items():
        tarball = cache / (package.replace("@", "-") + ".tgz")
        if not tarball.exists():
            try:
                command = ["npm", "pack", package, "--silent"]
                subprocess.run(command, cwd=cache, check=True, capture_output=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                print(f"bertviz: cannot fetch {package} with npm ({error}); bertviz will not run")
                return None
        with tarfile.open(tarball) as archive:
            scripts[name] = archive.extractfile(member).read()
    return scripts


# ---------------------------------------------------------------- serving and measuring


class ByteCount:
    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount: int) -> None:
        with self._lock:
            self.value += amount


def serve(root: Path, sent: ByteCount) -> ThreadingHTTPServer:
    """An HTTP server for `root` on 127.0.0.1 that adds every body it sends, harness pages aside, to `sent`."""

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                          ".json": "application/json", ".bin": "application/octet-stream"}

        def copyfile(self, source, outputfile):
            if not self.path.endswith(HARNESS):
                sent.add(os.fstat(source.fileno()).st_size)
            super().copyfile(source, outputfile)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def measure(playwright, chromium: str, url: str, viewer: str, timeout_s: float, sent: ByteCount,
            scripts: dict[str, bytes] | None, cell: Cell) -> None:
    """Load `url` in a fresh browser; add its first-paint time and heaps to `cell`, or set its status."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page()
        page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), partial(answer_offline, scripts, sent, cell))
        page.add_init_script(PAINT_PROBE % READY[viewer])
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        sent.value = 0
        page.goto(url, wait_until="commit", timeout=timeout_s * 1000)
        page.wait_for_function("window.__nmFirstPaint !== undefined", timeout=timeout_s * 1000, polling=100)
        cell.paint_ms.append(page.evaluate("window.__nmFirstPaint"))
        cell.sent = sent.value
        cell.heap_mb.append(js_heap(cdp))
        cdp.send("HeapProfiler.collectGarbage")
        cell.kept_mb.append(js_heap(cdp))
    except PlaywrightTimeout:
        cell.sent = sent.value
        cell.status = f"timed out (> {timeout_s:.0f} s)"
    except PlaywrightError as error:
        cell.status = "failed: " + str(error).splitlines()[0][:80]
    finally:
        browser.close()


def answer_offline(scripts: dict[str, bytes] | None, sent: ByteCount, cell: Cell, route) -> None:
    """Answer a request to another host with a local copy of the script, or abort it (there is no internet)."""
    name = route.request.url.rsplit("/", 1)[-1]
    if scripts and name in scripts:
        sent.add(len(scripts[name]))
        route.fulfill(body=scripts[name], content_type="text/javascript", headers={"access-control-allow-origin": "*"})
    else:
        cell.blocked.add(route.request.url)
        route.abort()


def js_heap(cdp) -> float:
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return metrics["JSHeapUsedSize"] / 1e6


# ---------------------------------------------------------------- report


def row(cell: Cell) -> str:
    page = cell.page
    sent = f"{cell.sent / 1e6:,.2f}" if cell.sent is not None else "–"
    prep = f"{page.prep_s:.2f}" if page.prep_s is not None else "–"
    if cell.finished:
        spread = f" ({min(cell.paint_ms):,.0f}–{max(cell.paint_ms):,.0f})" if len(cell.paint_ms) > 1 else ""
        paint = f"{median(cell.paint_ms):,.0f}{spread}"
        heap, kept = f"{median(cell.heap_mb):.1f}", f"{median(cell.kept_mb):.1f}"
    else:
        paint = heap = kept = "–"
    status = page.status if page.status != "ok" else cell.status
    if cell.blocked:
        status += "; blocked: " + ", ".join(sorted(cell.blocked))
    return f"| {page.n} | {page.viewer} | {sent} | {paint} | {heap} | {kept} | {prep} | {status} |"


def table(cells: list[Cell]) -> str:
    lines = [
        "| N | viewer | MB sent before first paint | first paint ms, median (min–max) | JS heap MB at paint "
        "| JS heap MB after GC | Python prep s | status |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    return "\n".join(lines + [row(cell) for cell in cells])


def ratios(cells: list[Cell]) -> str:
    """peer / ours for bytes, first paint and heap, wherever both painted."""
    by_key = {(cell.page.n, cell.page.viewer): cell for cell in cells}
    lines = [
        "| N | peer / ours | bytes × | first paint × | JS heap at paint × |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in sorted({cell.page.n for cell in cells}):
        for peer in VIEWERS[2:]:
            for ours in OURS:
                a, b = by_key.get((n, peer)), by_key.get((n, ours))
                if a and b and a.finished and b.finished:
                    paint = median(a.paint_ms) / median(b.paint_ms)
                    heap = median(a.heap_mb) / median(b.heap_mb)
                    lines.append(f"| {n} | {peer} / {ours} | {a.sent / b.sent:,.1f} | {paint:,.1f} | {heap:,.1f} |")
    return "\n".join(lines)


def goals(cells: list[Cell]) -> str:
    """The targets for ours at the largest size: live first paint < 1 s with <= 8 MB sent, static page < 2 MB."""
    largest = max(cell.page.n for cell in cells)
    by_viewer = {cell.page.viewer: cell for cell in cells if cell.page.n == largest}
    widget, static = by_viewer["nm-widget"], by_viewer["nm-static"]
    lines = [f"Goals at N={largest}:"]
    if widget.finished:
        paint, sent = median(widget.paint_ms), widget.sent
        lines.append(f"- live widget first paint {paint:,.0f} ms (goal < 1000): {'met' if paint < 1000 else 'MISSED'}")
        lines.append(f"- live widget sent {sent / 1e6:.2f} MB (goal <= 8): {'met' if sent <= 8e6 else 'MISSED'}")
    else:
        lines.append(f"- live widget: {widget.status}")
    if static.sent is not None:
        lines.append(f"- static view {static.sent / 1e6:.2f} MB (goal < 2): {'met' if static.sent < 2e6 else 'MISSED'}")
    return "\n".join(lines)


def environment(chromium_version: str) -> str:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    packages = ["neuronmap", "anywidget", "bertviz", "circuitsvis", "playwright", "torch", "transformers"]
    return (f"Chromium {chromium_version}; " + ", ".join(f"{p} {version(p)}" for p in packages)
            + f"; {os.cpu_count()} CPUs")


# ---------------------------------------------------------------- main


def prepare(sizes: list[int], root: Path, max_bytes: int, scripts_ready: bool) -> list[Page]:
    from neuronmap.attention_view import AttentionWidget  # noqa: F401  (built once, so prep excludes it)

    pages = []
    for n in sizes:
        print(f"N={n}: running the model and writing pages ...", flush=True)
        patterns = build_patterns(n)
        pages += write_ours(patterns, n, root)
        pages.append(write_bertviz(patterns, n, root, max_bytes, scripts_ready))
        pages.append(write_circuitsvis(patterns, n, root, max_bytes))
        del patterns
        gc.collect()
    return pages


def run_rounds(pages: list[Page], repeats: int, chromium: str, timeout_s: float,
               scripts: dict[str, bytes] | None, root: Path) -> tuple[list[Cell], str]:
    from playwright.sync_api import sync_playwright

    cells = [Cell(page) for page in pages]
    sent = ByteCount()
    server = serve(root, sent)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with sync_playwright() as playwright:
            probe = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            chromium_version = probe.version
            probe.close()
            for round_index in range(repeats):
                for n in sorted({page.n for page in pages}):
                    row_cells = [cell for cell in cells if cell.page.n == n]
                    shift = round_index % len(row_cells)
                    for cell in row_cells[shift:] + row_cells[:shift]:
                        if cell.page.path is None or cell.status != "ok":
                            continue
                        print(f"round {round_index + 1}/{repeats}  N={n}  {cell.page.viewer} ...", flush=True)
                        measure(playwright, chromium, base + cell.page.path, cell.page.viewer, timeout_s, sent,
                                scripts, cell)
    finally:
        server.shutdown()
    return cells, chromium_version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024], help="token counts N")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every size and viewer (median reported)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a page gets to paint")
    parser.add_argument("--max-page-mb", type=float, default=300.0, help="peer pages predicted larger are not run")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    parser.add_argument("--vendor-dir", type=Path, default=Path(tempfile.gettempdir()) / "neuronmap-bench-vendor",
                        help="cache of bertviz's CDN scripts (npm tarballs)")
    args = parser.parse_args()

    scripts = bertviz_scripts(args.vendor_dir)
    with tempfile.TemporaryDirectory(prefix="nm-attention-view-") as folder:
        root = Path(folder)
        pages = prepare(args.sizes, root, int(args.max_page_mb * 1e6), scripts is not None)
        cells, chromium_version = run_rounds(pages, args.repeats, args.chromium, args.timeout, scripts, root)

    print()
    print(f"{len(args.sizes)} sizes x {len(VIEWERS)} viewers, {args.repeats} repeats, timeout {args.timeout:.0f} s")
    print(environment(chromium_version))
    print()
    print(table(cells))
    print()
    print(ratios(cells))
    print()
    print(goals(cells))


if __name__ == "__main__":
    main()
