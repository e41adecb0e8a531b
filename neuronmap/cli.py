"""The `neuronmap` command line (also `python -m neuronmap`). Errors are one line on stderr with exit status 1
(argparse's usage errors exit with 2); `--debug` shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from .errors import NeuronMapError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = parser.parse_args(argv)
    arguments.argv = argv
    if arguments.command is None:
        parser.print_help()
        return 2
    try:
        return arguments.run(arguments)
    except (NeuronMapError, OSError) as error:
        if arguments.debug:
            raise
        print(f"neuronmap {arguments.command}: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neuronmap {arguments.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronmap", description="Look inside transformer models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    extract = commands.add_parser(
        "extract",
        help="stream activations at some hook points for a dataset into an HDF5 activation store",
        description="Stream a dataset's activations at some hook points into an HDF5 activation store. An "
        "interrupted extraction continues with --resume; under torchrun (or with --processes N) each process "
        "writes a shard of the documents and the output file joins them.",
    )
    extract.add_argument("model", help="zoo name, local directory or hub id")
    extract.add_argument("--hooks", action="append", required=True, metavar="PATTERN",
                         help="hook name or glob pattern, e.g. 'blocks.*.hook_resid_post' (repeat for more)")
    extract.add_argument("--input", required=True, metavar="PATH",
                         help="text file (one document per line) or JSON-lines file (.jsonl) with a text field")
    extract.add_argument("--out", required=True, metavar="PATH", help="the store to write (.h5)")
    extract.add_argument("--text-field", default="text", help="the JSON-lines field holding the text (default: text)")
    extract.add_argument("--batch-size", type=int, default=16, help="context windows per forward pass (default: 16)")
    extract.add_argument("--context-length", type=int, default=None,
                         help="window length; longer documents are split (default: the model's context)")
    extract.add_argument("--positions", default="all", type=_positions,
                         help="which positions of each window to keep: all, last, an int, or START:STOP")
    extract.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="storage dtype (default: float16)")
    extract.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="compress the store's chunks")
    extract.add_argument("--device", default=None, help="where the model runs (default: cuda if available, else cpu)")
    existing = extract.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the store at --out if it exists")
    existing.add_argument("--overwrite", action="store_true", help="replace the store at --out if it exists")
    extract.add_argument("--processes", type=int, default=1,
                         help="launch this many processes with torchrun, each extracting a shard (default: 1)")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.add_argument("--debug", action="store_true", help="show tracebacks")
    extract.set_defaults(run=_extract)
    _zoo_parser(commands)
    hooks = commands.add_parser(
        "hooks", help="list a model's hook points with their shapes for a sample input",
        description="Run MODEL once on a sample input and list every hook point with the shape it has there.",
    )
    hooks.add_argument("model", help="zoo name, local directory or hub id")
    hooks.add_argument("--input", default="When Mary and John went to the store, John gave a drink to",
                       help="the sample text (default: an IOI sentence)")
    hooks.add_argument("--debug", action="store_true", help="show tracebacks")
    hooks.set_defaults(run=_hooks)
    _report_parser(commands)
    parser.set_defaults(debug=False)
    return parser


def _zoo_parser(commands: argparse._SubParsersAction) -> None:
    from .zoo.train import add_arguments

    zoo = commands.add_parser("zoo", help="the model zoo: list it, show a card, retrain an entry",
                              description="The zoo's small trained models and SAEs, shipped in the package.")
    actions = zoo.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every zoo entry with its task, size and measured mechanisms",
                                 description="List every zoo entry with its task, size and measured mechanisms.")
    card = actions.add_parser("card", help="a trained entry's card (JSON), as its recipe measured it",
                              description="Print a trained zoo model's or SAE's card as JSON.")
    card.add_argument("name", help="a zoo model or SAE, e.g. ioi or ioi-resid0")
    train = actions.add_parser("train", help="retrain an entry from its recipe into a new directory",
                               description="Retrain a zoo model or SAE from its recipe (into ./NAME-retrained by "
                               "default; the shipped copy only with --replace-shipped).")
    add_arguments(train)
    for action, run in ((listing, _zoo_list), (card, _zoo_card), (train, _zoo_train)):
        action.add_argument("--debug", action="store_true", help="show tracebacks")
        action.set_defaults(run=run)


def _zoo_list(arguments: argparse.Namespace) -> int:
    from . import zoo

    rows = [("name", "architecture", "parameters", "task", "mechanisms")]
    for entry in zoo.list():
        task = _cut(entry.task, 60) + ("" if entry.available else " (needs an extra)")
        found = f"{len(entry.mechanisms)} measured" if entry.mechanisms else ""
        rows.append((entry.name, entry.architecture, f"{entry.parameters:,}" if entry.parameters else "?", task, found))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("each trained entry's card: neuronmap zoo card NAME")
    return 0


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _zoo_card(arguments: argparse.Namespace) -> int:
    import json

    from . import zoo

    print(json.dumps(zoo.card(arguments.name), indent=2))
    return 0


def _zoo_train(arguments: argparse.Namespace) -> int:
    from .zoo.train import retrain

    retrain(arguments.name, out=arguments.out, replace_shipped=arguments.replace_shipped, quick=arguments.quick,
            seed=arguments.seed)
    return 0


def _hooks(arguments: argparse.Namespace) -> int:
    import transformers

    from . import load

    transformers.logging.disable_progress_bar()
    model = load(arguments.model)
    trace = model.run(arguments.input, capture=model.hook_names)
    tokens = len(trace.tokens[0])
    print(f"{model.name}: {len(model.hook_names)} hook points; shapes for one input of {tokens} tokens")
    width = max(len(name) for name in model.hook_names)
    for name in model.hook_names:
        print(f"{name.ljust(width)}  {list(trace[name].shape) if name in trace else 'not reached'}")
    return 0


def _report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="run a report template notebook and write it as one standalone HTML page",
        description="Run a report template from notebooks/ with papermill (on this Python) and write one HTML page "
        "that renders offline. A failing cell exits with status 1 naming the cell, and keeps the executed notebook "
        "at OUTPUT.partial.ipynb. `--list` shows the templates and their parameters.",
    )
    report.add_argument("template", nargs="?", help="the template's name, e.g. model_overview")
    report.add_argument("-p", "--parameter", action="append", default=[], metavar="KEY=VALUE",
                        help="a template parameter, read with the type of its default (lists as JSON); repeat for more")
    report.add_argument("-o", "--output", metavar="PATH", help="the HTML file to write (default: TEMPLATE.html)")
    report.add_argument("--notebook", metavar="PATH",
                        help="also keep the executed notebook here (to open in Jupyter, or to re-run under nbval)")
    report.add_argument("--list", action="store_true", help="list the templates and their parameters")
    report.add_argument("--debug", action="store_true", help="show tracebacks")
    report.set_defaults(run=_report)


def _report(arguments: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("papermill", "nbconvert", "ipykernel") if importlib.util.find_spec(name) is None]
    if missing:
        raise NeuronMapError(f"neuronmap report needs papermill, nbconvert and ipykernel ({', '.join(missing)} not "
                             "installed): pip install 'neuronmap[notebook]'")
    from . import reports

    if arguments.list:
        print(reports.describe())
        return 0
    if arguments.template is None:
        raise NeuronMapError(f"name a template ({', '.join(reports.templates())}) or pass --list")
    parameters = reports.parse_parameters(arguments.template, arguments.parameter)
    output = arguments.output or f"{arguments.template}.html"
    started = time.perf_counter()
    written = reports.run_report(arguments.template, output, parameters, notebook=arguments.notebook)
    print(f"wrote {written} ({os.path.getsize(written) / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def _positions(text: str):
    if text in ("all", "last"):
        return None if text == "all" else "last"
    try:
        if ":" in text:
            start, stop = (int(part) if part else None for part in text.split(":", 1))
            return slice(start, stop)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not all, last, an int or START:STOP") from None


def _extract(arguments: argparse.Namespace) -> int:
    from . import load
    from .store import extract

    if arguments.processes > 1:
        return _launch(arguments.processes, arguments.argv)
    if os.path.exists(arguments.out) and not (arguments.resume or arguments.overwrite):
        raise NeuronMapError(f"{arguments.out} exists: pass --resume to continue it or --overwrite to replace it")
    model = load(arguments.model)
    model.module.to(_device(arguments.device))
    started = time.perf_counter()
    store = extract(
        model, arguments.input, arguments.hooks, arguments.out, batch_size=arguments.batch_size,
        context_length=arguments.context_length, positions=arguments.positions, dtype=DTYPES[arguments.dtype],
        compression=arguments.compression, text_field=arguments.text_field, overwrite=arguments.overwrite,
        progress=not arguments.no_progress,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        elapsed = time.perf_counter() - started
        print(f"{store!r}\n{len(store):,} rows in {elapsed:.1f} s ({len(store) / elapsed:,.0f} rows/s); read it with "
              f"neuronmap.open_store({arguments.out!r})")
    store.close()
    return 0


def _device(requested: str | None) -> torch.device:
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _launch(processes: int, argv: list[str]) -> int:
    """Run this same command under torchrun with `processes` processes on this machine."""
    if "WORLD_SIZE" in os.environ:
        raise NeuronMapError("--processes starts torchrun itself: leave it out when running under torchrun")
    kept, skip = [], False
    for argument in argv:
        if skip or argument.startswith("--processes"):
            skip = argument == "--processes"
            continue
        kept.append(argument)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "neuronmap", *kept]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
