"""Report benchmark of issue 14, on the CPU: each template run by `neuronmap report` with its defaults on the zoo
models, against the plain way to get an HTML page of a parameterised notebook, `papermill` then `jupyter nbconvert
--to html` (the stock lab template, which loads require.js from a CDN and leaves plotly figures out), in wall time,
the children's CPU time and HTML size.

    .venv/bin/python benchmarks/reports.py              # 3 interleaved rounds of every template
    .venv/bin/python benchmarks/reports.py --rounds 5 --templates model_overview

Each run is a fresh process, as a user starts it (interpreter, imports, kernel start, execution, export). Rounds
interleave the two ways, order rotated each round; the table gives medians over rounds and the median of the
per-round ratios (neuronmap report / papermill + nbconvert). Results go to `benchmarks/RESULTS-reports.md`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--templates", nargs="*", default=None, help="default: every template in notebooks/")
    arguments = parser.parse_args()
    names = arguments.templates or sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    records = {(name, way): {"wall": [], "cpu": [], "bytes": []} for name in names for way in WAYS}
    ratios = {name: {"wall": [], "cpu": []} for name in names}
    with tempfile.TemporaryDirectory(prefix="neuronmap-bench-reports-") as folder:
        for round_ in range(arguments.rounds):
            for name in names:
                order = list(WAYS)[round_ % 2:] + list(WAYS)[: round_ % 2]
                this = {}
                for way in order:
                    wall, cpu, size = _measure(WAYS[way], name, Path(folder), env)
                    this[way] = (wall, cpu)
                    for key, value in zip(("wall", "cpu", "bytes"), (wall, cpu, size)):
                        records[(name, way)][key].append(value)
                    print(f"round {round_} {name} {way}: {wall:.1f} s wall, {cpu:.1f} s CPU, {size / 1e6:.2f} MB", flush=True)
                ratios[name]["wall"].append(this["neuronmap report"][0] / this["papermill + nbconvert"][0])
                ratios[name]["cpu"].append(this["neuronmap report"][1] / this["papermill + nbconvert"][1])
    _write(names, records, ratios, arguments.rounds)


def _neuronmap_report(name: str, folder: Path) -> tuple[list[list[str]], Path]:
    out = folder / f"{name}.html"
    return [[str(BIN / "neuronmap"), "report", name, "-o", str(out)]], out


def _papermill_nbconvert(name: str, folder: Path) -> tuple[list[list[str]], Path]:
    executed = folder / f"{name}-executed.ipynb"
    return [
        [str(BIN / "papermill"), "-k", "python3", "--no-progress-bar", str(ROOT / "notebooks" / f"{name}.ipynb"), str(executed)],
        [str(BIN / "jupyter"), "nbconvert", "--to", "html", "--no-input", str(executed)],
    ], executed.with_suffix(".html")


WAYS = {"neuronmap report": _neuronmap_report, "papermill + nbconvert": _papermill_nbconvert}


def _measure(way, name: str, folder: Path, env: dict) -> tuple[float, float, int]:
    """Wall seconds, the children's CPU seconds (user + system, the kernel included) and the page's bytes."""
    commands, page = way(name, folder)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, env=env, cwd=folder, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    size = page.stat().st_size
    page.unlink()
    return wall, cpu, size


def _write(names, records, ratios, rounds) -> None:
    lines = [
        "# Reports: `neuronmap report` vs papermill + nbconvert",
        "",
        f"Produced by `benchmarks/reports.py` ({rounds} interleaved rounds, medians; 2 shared CPU cores, "
        f"OMP_NUM_THREADS=1). Each template runs with its defaults (zoo models). CPU is the child processes' user + "
        "system time (the kernel included). The ratio columns are medians of per-round ratios. The stock nbconvert page "
        "is not offline: it loads require.js from a CDN and leaves plotly figures out, so its size is the page without "
        "plotly.js.",
        "",
        "| template | neuronmap report wall | CPU | HTML | papermill + nbconvert wall | CPU | HTML | wall ratio | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        ours, theirs = records[(name, "neuronmap report")], records[(name, "papermill + nbconvert")]
        cells = [name]
        for record in (ours, theirs):
            cells += [f"{statistics.median(record['wall']):.1f} s", f"{statistics.median(record['cpu']):.1f} s",
                      f"{statistics.median(record['bytes']) / 1e6:.2f} MB"]
        cells += [f"{statistics.median(ratios[name]['wall']):.2f}", f"{statistics.median(ratios[name]['cpu']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (ROOT / "benchmarks" / "RESULTS-reports.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
