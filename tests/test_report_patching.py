"""`neuronmap report patching`: the template's parameters, bad input refused in one line, and one real run through
the CLI on the zoo's ioi model whose page, in Chromium with every network request refused, shows the prompt pairs
(a `<script>` among them staying text), each pair's logit difference computed here by hand, and every sweep with
the values, titles and strongest cells that `nm.patch` and `nm.patching.path_patch` give for the same inputs."""

from __future__ import annotations

import ast
import json
import re
from html import unescape
from pathlib import Path

import pytest
import torch

import neuronmap as nm
from neuronmap.cli import main

from conftest import declared_parameters, parameters_cell, report_error_line

TEMPLATE = Path(__file__).resolve().parents[1] / "notebooks" / "patching.ipynb"
XSS = "<script>window.pwned=1</script>"
CLEAN = [f"{XSS} When Mary and John went to the store, John gave a drink to", "When Tom and James went to the park, James gave a ball to"]
CORRUPTED = [f"{XSS} When Mary and John went to the store, Mary gave a drink to", "When Tom and James went to the park, Tom gave a ball to"]
ANSWERS = [["Mary", "John"], ["Tom", "James"]]
DIRECTION = "noise"
SWEEPS = [  # (what the report calls it, what it patches) in the report's order
    ("residual stream cell", {"what": "resid_post", "by": "layer_pos"}),
    ("attn_out cell", {"what": "attn_out", "by": "layer_pos"}),
    ("mlp_out cell", {"what": "mlp_out", "by": "layer_pos"}),
    ("head", {"what": "z", "by": "layer_head"}),
    ("head and position", {"what": "z", "by": "layer_head_pos"}),
    ("direct path (heads)", {"senders": "heads"}),
    ("direct path (mlps)", {"senders": "mlps"}),
]


def _cells() -> list[dict]:
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))["cells"]


# ---- fast: the template and its parameters ----------------------------------------------------------------------


def test_the_template_is_a_report_with_a_parameters_cell_and_no_outputs():
    cells = _cells()
    assert sum(cell["cell_type"] == "markdown" for cell in cells) >= 3
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in cells if cell["cell_type"] == "code")
    assert "".join(cells[0]["source"]).startswith("# Activation patching report")


def test_the_parameters_are_declared_with_their_types_and_a_help_comment_on_each_line():
    declared = declared_parameters(TEMPLATE)
    assert {name: type(value) for name, value in declared.items()} == {
        "model": str, "clean": list, "corrupted": list, "answers": list, "direction": str, "sweeps": list,
    }
    lines = parameters_cell(TEMPLATE).splitlines()
    assert len(lines) == len(declared)
    assert all(" = " in line and "  # " in line and line.split("  # ")[-1].strip() for line in lines)


def test_the_defaults_pair_each_clean_prompt_with_a_corrupted_one_and_two_answers():
    declared = declared_parameters(TEMPLATE)
    assert declared["model"] == "ioi" and declared["direction"] == "denoise"
    assert len(declared["clean"]) == len(declared["corrupted"]) == len(declared["answers"]) >= 2
    assert all(isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1] for pair in declared["answers"])
    setup = "".join(next(c["source"] for c in _cells() if "SWEEPS = " in "".join(c["source"])))
    every_sweep = ast.literal_eval(setup.split("SWEEPS = ", 1)[1].splitlines()[0])
    assert declared["sweeps"] == list(every_sweep)  # the default report runs every section


def test_the_defaults_are_an_experiment_the_zoo_ioi_model_can_patch():
    declared = declared_parameters(TEMPLATE)
    model = nm.load(declared["model"])
    correct, wrong = zip(*declared["answers"])
    result = nm.patch(model, declared["clean"], declared["corrupted"], nm.patching.logit_diff(list(correct), list(wrong)),
                      what="resid_post", by="layer_pos", progress=False)
    assert result.clean > 1 and result.corrupt < -1  # the clean prompts prefer their answer, the corrupted the other
    (layer, position), value = result.top(1)[0]
    assert abs(value - 1) < 0.1  # one residual vector restores the behaviour


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("prompts=[]", "template 'patching' has no parameter 'prompts'; its parameters: model, clean, corrupted, answers, "
                       "direction, sweeps"),
        ("clean=one prompt", "parameter 'clean' must be of type list"),
        ("answers={'Mary': 'John'}", "parameter 'answers' must be of type list"),
    ],
    ids=["undeclared", "not-a-list", "a-dict"],
)
def test_a_bad_parameter_is_one_line_with_status_1_and_nothing_written(pair, message, capsys, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "patching", "-p", pair, "-o", str(out)]) == 1
    assert report_error_line(capsys).startswith(f"neuronmap report: error: {message}")
    assert list(tmp_path.iterdir()) == []


# ---- slow: one run through the CLI, checked in Chromium against the library's own results -------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patching") / "patching.html"
    lists = {"clean": CLEAN, "corrupted": CORRUPTED, "answers": ANSWERS}
    pairs = [f"{name}={json.dumps(value)}" for name, value in lists.items()] + [f"direction={DIRECTION}"]
    argv = ["report", "patching", *[argument for pair in pairs for argument in ("-p", pair)], "-o", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def expected() -> list[tuple[str, nm.patching.PatchingResult]]:
    """Every sweep of the report, computed here by the library for the same inputs."""
    model = nm.load("ioi")
    metric = nm.patching.logit_diff([a for a, _ in ANSWERS], [b for _, b in ANSWERS])
    results = []
    for name, arguments in SWEEPS:
        if "senders" in arguments:
            result = nm.patching.path_patch(model, CLEAN, CORRUPTED, metric, direction=DIRECTION, **arguments)
        else:
            result = nm.patch(model, CLEAN, CORRUPTED, metric, direction=DIRECTION, progress=False, **arguments)
        results.append((name, result))
    return results


def _two_places(value: float) -> str:
    """As the report shows a number: two decimals, and never "-0.00"."""
    text = f"{value:.2f}"
    return text[1:] if text == "-0.00" else text


def _strongest(name: str, result) -> tuple[str, str, str]:
    labels, value = result.top(1)[0]
    return name, ", ".join(f"{axis} {label}" for axis, label in zip(result.axes, labels)), _two_places(value)


@pytest.mark.slow
def test_the_report_is_one_offline_file(report):
    html = report.read_text(encoding="utf-8")
    print(f"patching report: {len(html.encode()) / 1e6:.2f} MB")
    assert not re.search(r"<script[^>]+\bsrc=", html) and not re.search(r"<link[^>]+href=[\"']?https?:", html)
    assert "require.js" not in html
    assert XSS not in html  # every prompt escaped
    assert sorted(p.name for p in report.parent.iterdir()) == [report.name]


@pytest.mark.slow
@pytest.mark.browser
def test_the_prompt_pairs_and_their_baseline_are_shown_as_text(report, expected, page):
    page.goto(report.as_uri())
    model = nm.load("ioi")

    def by_hand(prompt: str, good: str, bad: str) -> str:
        with torch.no_grad():
            logits = model.module(**model.tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        ids = model.tokenizer.convert_tokens_to_ids([good, bad])
        return _two_places(float(logits[ids[0]] - logits[ids[1]]))

    rows = page.locator(".nm-table", has_text="2 prompt pairs").locator("tbody tr").all_inner_texts()
    shown = [[cell.strip() for cell in row.split("\t")] for row in rows]
    assert shown == [
        [str(i), c, k, a, b, by_hand(c, a, b), by_hand(k, a, b)]
        for i, (c, k, (a, b)) in enumerate(zip(CLEAN, CORRUPTED, ANSWERS))
    ]
    residual = expected[0][1]
    assert page.get_by_text(f"Mean logit difference: clean {_two_places(residual.clean)}, corrupted {_two_places(residual.corrupt)}.").count() == 1
    assert page.get_by_text("the pairs have different lengths").count() == 1  # the XSS pair is longer
    assert page.evaluate("window.pwned") is None
    assert page.errors == [] and page.external_requests == []


@pytest.mark.slow
@pytest.mark.browser
def test_every_sweep_shows_the_librarys_values_and_strongest_cell(report, expected, page):
    page.goto(report.as_uri())
    heatmaps = page.locator(".nm-heatmap")
    assert heatmaps.count() == len(SWEEPS)
    for i, (name, result) in enumerate(expected):
        heatmap = heatmaps.nth(i)
        assert heatmap.locator(".nm-hm-title").inner_text().strip() == result.description
        titles = heatmap.locator("td").evaluate_all("cells => cells.map(cell => cell.title)")
        values = [float(title.rsplit("value: ", 1)[1]) for title in titles]  # each cell's exact value, in grid order
        assert torch.allclose(torch.tensor(values), result.values.flatten(), atol=1e-5), name
        _, where, value = _strongest(name, result)
        assert page.get_by_text(f"Strongest {name}: {where} ({value}).").count() == 1
    model = nm.load("ioi")
    positions = [f"{p} {token}" for p, token in enumerate(model.to_str_tokens(CLEAN[0]))]
    columns = heatmaps.first.locator("thead th:not(.nm-hm-corner)").all_inner_texts()
    assert [column.strip() for column in columns] == positions  # the first clean prompt's tokens, <unk> as text
    summary = page.locator(".nm-table", has_text="strongest cells (noise)").locator("tbody tr").all_inner_texts()
    assert [tuple(cell.strip() for cell in row.split("\t")) for row in summary] == [_strongest(*pair) for pair in expected]
    assert page.errors == [] and page.external_requests == []


@pytest.mark.slow
@pytest.mark.browser
def test_the_residual_sweep_is_also_a_plotly_figure_with_the_same_values(report, expected, page):
    page.goto(report.as_uri())
    page.wait_for_selector(".nm-plotly .js-plotly-plot .main-svg", timeout=20_000)
    assert page.locator(".nm-plotly .js-plotly-plot").count() == 1
    z = page.evaluate("document.querySelector('.nm-plotly .js-plotly-plot')._fullData[0].z")  # decoded, as drawn
    assert torch.allclose(torch.tensor(z, dtype=torch.float32), expected[0][1].values, atol=1e-5)
    assert page.locator(".nm-plotly .js-plotly-plot .main-svg .hm").count() == 1  # the heatmap trace is drawn
    assert page.errors == [] and page.external_requests == []


@pytest.fixture(scope="module")
def script_token_report(tmp_path_factory) -> tuple[Path, Path]:
    """The report on a small random GPT-2 whose vocabulary holds `XSS` as one token, used in a prompt and as an
    answer, so it reaches the page as a token too: position labels, hover titles, plotly's axis. (report, model)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import WORDS, make_model

    folder = tmp_path_factory.mktemp("script-token")
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate([*WORDS, XSS])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    make_model("gpt2").save_pretrained(folder / "model")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder / "model")
    given = {
        "clean": [f"{XSS} mary and john went to the store john gave a drink to"],
        "corrupted": [f"{XSS} mary and john went to the store mary gave a drink to"],
        "answers": [[XSS, "john"]],
    }
    out = folder / "report.html"
    pairs = [f"model={folder / 'model'}"] + [f"{name}={json.dumps(value)}" for name, value in given.items()]
    assert main(["report", "patching", *[a for pair in pairs for a in ("-p", pair)], "-o", str(out)]) == 0
    return out, folder / "model"


@pytest.mark.slow
@pytest.mark.browser
def test_a_script_token_stays_text_in_the_table_the_heatmaps_and_the_figure(script_token_report, page):
    out, folder = script_token_report
    assert XSS not in out.read_text(encoding="utf-8")
    page.goto(out.as_uri())
    page.wait_for_selector(".nm-plotly .js-plotly-plot .main-svg", timeout=20_000)
    row = page.locator(".nm-table", has_text="1 prompt pairs").locator("tbody tr").inner_text().split("\t")
    assert row[1:5] == [f"{XSS} mary and john went to the store john gave a drink to",
                        f"{XSS} mary and john went to the store mary gave a drink to", XSS, "john"]
    tokens = nm.load(str(folder)).to_str_tokens(f"{XSS} mary and john went to the store john gave a drink to")
    assert tokens[0] == XSS
    by_position = page.locator(".nm-heatmap", has_text="by layer × position").all()
    assert len(by_position) == 3  # resid_post, attn_out, mlp_out
    for heatmap in by_position:
        hovers = heatmap.locator("thead th:not(.nm-hm-corner)").evaluate_all("cells => cells.map(cell => cell.title)")
        assert hovers == [f"position: {p} {token}" for p, token in enumerate(tokens)]
    ticks = page.locator(".nm-plotly .xtick text").all_text_contents()
    assert len(ticks) == len(tokens) and ticks[0].startswith("0 <script>window.pwned=1</")  # shown as text, cut
    assert page.evaluate("window.pwned") is None
    assert page.errors == [] and page.external_requests == []


@pytest.mark.slow
def test_chosen_sweeps_only_and_one_answer_pair_for_all_prompts_given_as_token_ids(tmp_path):
    model = nm.load("ioi")
    clean = [CLEAN[0], "When Mary and John went to the park, John gave a ball to"]
    corrupted = [CORRUPTED[0], "When Mary and John went to the park, Mary gave a ball to"]
    mary = model.tokenizer.convert_tokens_to_ids("Mary")
    out = tmp_path / "report.html"
    given = {"clean": clean, "corrupted": corrupted, "answers": [[mary, "John"]], "sweeps": ["heads"]}
    assert main(["report", "patching", *[a for k, v in given.items() for a in ("-p", f"{k}={json.dumps(v)}")], "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    text = unescape(re.sub(r"<[^>]+>", "", html))
    assert html.count('class="nm-heatmap"') == 2  # the residual stream's, always, and the heads'
    for sweep in ("attn_out", "mlp_out", "heads_by_position", "direct_paths"):
        assert f"Not run: add '{sweep}' to the sweeps parameter." in text
    metric = nm.patching.logit_diff("Mary", "John")
    heads = nm.patch(model, clean, corrupted, metric, what="z", by="layer_head", progress=False)
    _, where, value = _strongest("head", heads)
    assert f"Strongest head: {where} ({value})." in text
    assert html.count("<td>Mary</td>") == 0 and html.count(f"<td>{mary}</td><td>John</td>") == 2  # as given, per pair


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (f"corrupted={json.dumps(CORRUPTED[:1])}",
         "InputError: 2 clean prompts but 1 corrupted: patching needs one corrupted prompt per clean one"),
        (f"corrupted={json.dumps([CORRUPTED[0], 'When Tom and James went to the park, Tom gave a ball'])}",
         "InputError: clean prompt 1 is 15 tokens but corrupted prompt 1 is 14: patching needs each pair to have the same"),
        ("answers=[[\"Mary Ann\", \"John\"], [\"Tom\", \"James\"]]", "InputError: correct answer 'Mary Ann' is 2 tokens"),
        ("answers=[\"Mary\", \"John\"]", "InputError: answers must be a list of [correct, wrong] pairs"),
    ],
    ids=["pair-count", "token-count", "answer-tokens", "answer-shape"],
)
def test_mismatched_prompts_or_answers_fail_in_one_line_naming_the_cell_and_write_no_html(pair, message, capsys, tmp_path):
    out = tmp_path / "report.html"
    given = {"clean": json.dumps(CLEAN), "corrupted": json.dumps(CORRUPTED), "answers": json.dumps(ANSWERS)}
    given.update([pair.split("=", 1)])
    assert main(["report", "patching", *[a for name, value in given.items() for a in ("-p", f"{name}={value}")], "-o", str(out)]) == 1
    err = report_error_line(capsys)
    partial = tmp_path / "report.html.partial.ipynb"
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]  # no HTML, the notebook kept
    cells = json.loads(partial.read_text(encoding="utf-8"))["cells"]
    failed = [i for i, cell in enumerate(cells) if any(o["output_type"] == "error" for o in cell.get("outputs", []))]
    assert len(failed) == 1
    first_line = "".join(cells[failed[0]]["source"]).splitlines()[0]
    assert err.startswith(f"neuronmap report: error: cell {failed[0]} failed ({first_line!r}): {message}"), err
    assert err.endswith(f"kept at {partial}")
