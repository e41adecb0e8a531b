"""`neuronmap report`: the templates in notebooks/ run through the real CLI on induction-2l and give one HTML page
whose DOM in Chromium, with every network request refused, holds the views the library computes for the same
inputs; prompts stay text; bad input is one line on stderr with status 1 and no file at the output path; a failing
cell is named and its notebook kept; the templates ship in the wheel and run from it."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neuronmap as nm
from neuronmap import reports
from neuronmap.cli import main

from conftest import declared_parameters, report_error_line

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = [path.stem for path in TEMPLATES]
XSS = "<script>window.pwned=1</script>"
PROMPT = "the cat sat on the mat"


# ---- fast: the templates, --list, parameters, bad input that is caught before a kernel starts ------------------


def test_the_templates_are_notebooks_with_a_parameters_cell_and_no_outputs():
    assert NAMES == ["attention", "model_overview", "patching", "sae"]
    for path in TEMPLATES:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        assert declared_parameters(path), path
        assert all(not cell.get("outputs") for cell in cells if cell["cell_type"] == "code"), f"{path.name} has outputs"
        assert sum(cell["cell_type"] == "markdown" for cell in cells) >= 3, f"{path.name} has too little prose"


def test_the_checkout_finds_its_templates():
    assert reports.templates_dir() == ROOT / "notebooks"


def test_list_names_every_template_with_its_parameters_and_defaults(capsys):
    assert main(["report", "--list"]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"^(?=\S)", out, flags=re.MULTILINE)
    listed = {block.splitlines()[0]: block for block in blocks if block.strip()}
    assert sorted(listed) == [path.stem for path in TEMPLATES]
    for path in TEMPLATES:
        lines = listed[path.stem].splitlines()[1:]
        declared = declared_parameters(path)
        parsed = [re.fullmatch(r"  -p (\w+)=…  \((\w+), default (.+?)\)(?:: (.*))?", line).groups() for line in lines]
        assert [name for name, *_ in parsed] == list(declared)
        source = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for (name, kind, shown, help), default in zip(parsed, declared.values()):
            assert kind == type(default).__name__
            assert (json.loads(shown) if isinstance(default, (str, list)) else ast.literal_eval(shown)) == default
            assert help and any(f"# {help}" in "".join(cell["source"]) for cell in source)


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("score_batch=3", 3),
        ("prompt=1 + 1", "1 + 1"),
        ("prompt=", ""),
        ("model=a=b", "a=b"),
    ],
)
def test_parameters_are_read_with_the_type_of_their_default(pair, expected):
    name = pair.split("=")[0]
    assert reports.parse_parameters("model_overview", [pair]) == {name: expected}


@pytest.mark.parametrize("text", ['["a", "b"]', "['a', 'b']"])
def test_a_list_parameter_is_json_or_a_python_literal(text):
    assert reports.parse_parameters("attention", [f"prompts={text}"]) == {"prompts": ["a", "b"]}


def test_bool_and_float_parameters_follow_their_defaults():
    assert [reports.catalog._typed("x", text, False) for text in ("true", "False", "1", "no")] == [True, False, True, False]
    assert reports.catalog._typed("x", "2", 0.5) == 2.0 and isinstance(reports.catalog._typed("x", "2", 0.5), float)
    with pytest.raises(nm.InputError, match="must be of type bool"):
        reports.catalog._typed("x", "maybe", False)
    with pytest.raises(nm.InputError, match="must be of type float"):
        reports.catalog._typed("x", "[1]", 0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "model_overvue"], f"unknown report template 'model_overvue'; templates: {', '.join(NAMES)}"),
        (["report", "model_overview", "-p", "layers=2"],
         "template 'model_overview' has no parameter 'layers'; its parameters: model, prompt, score_batch"),
        (["report", "model_overview", "-p", "score_batch=eight"],
         "parameter 'score_batch' must be of type int (its default is 8), got 'eight'"),
        (["report", "model_overview", "-p", "score_batch=2.5"], "parameter 'score_batch' must be of type int"),
        (["report", "attention", "-p", "prompts=just one"], "parameter 'prompts' must be of type list"),
        (["report", "attention", "-p", "prompts"], "parameter 'prompts' is not key=value"),
        (["report"], f"name a template ({', '.join(NAMES)}) or pass --list"),
    ],
    ids=["template", "undeclared", "int", "int-not-float", "list", "no-value", "no-template"],
)
def test_bad_input_is_one_line_with_status_1_and_nothing_written(argv, message, capsys, tmp_path):
    out = tmp_path / "report.html"
    assert main([*argv, "-o", str(out)]) == 1
    assert report_error_line(capsys).startswith(f"neuronmap report: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_an_output_in_a_missing_folder_is_refused_before_running(capsys, tmp_path):
    out = tmp_path / "missing" / "report.html"
    assert main(["report", "model_overview", "-o", str(out)]) == 1
    assert report_error_line(capsys) == f"neuronmap report: error: the output's folder {str(out.parent)!r} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_report_has_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["report", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: neuronmap report") and "--list" in out and "KEY=VALUE" in out


def test_importing_neuronmap_does_not_import_the_report_machinery():
    code = "import sys, neuronmap; print([m for m in ('neuronmap.reports', 'papermill', 'nbconvert') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def _executed_notebook_with_figures(*figures) -> object:
    """A notebook as a kernel leaves it: markdown, then each plotly figure as the JSON mime bundle JupyterLab draws."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# Figures")]
    for figure in figures:
        bundle = {"application/vnd.plotly.v1+json": json.loads(figure.to_json()), "text/plain": ["Figure"]}
        notebook.cells.append(nbformat.v4.new_code_cell("display(figure)", outputs=[
            nbformat.v4.new_output("display_data", data=bundle)]))
    return notebook


@pytest.mark.browser
def test_plotly_figures_render_offline_from_plotly_js_embedded_once(page, tmp_path):
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    bars = go.Figure(go.Bar(x=["a", XSS], y=[3, 5]), layout={"title": {"text": f"bars {XSS}"}})
    heat = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    notebook = _executed_notebook_with_figures(bars, heat)
    before = json.dumps(notebook)
    html = reports.export_html(notebook, title="figures")
    assert json.dumps(notebook) == before  # the notebook itself is left as it was
    assert html.count('id="nm-plotly-js"') == 1 and html.count('class="nm-plotly"') == 2
    assert XSS not in html and len(html.encode()) < 0.5 * len(get_plotlyjs().encode())  # deflated: well under its size
    path = tmp_path / "figures.html"
    path.write_text(html, encoding="utf-8")
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('.nm-plotly .js-plotly-plot .main-svg').length >= 2", timeout=20_000)
    first, second = page.locator(".nm-plotly").all()
    assert first.locator(".gtitle").text_content() == f"bars {XSS}"  # a title holding <script> is drawn as text
    assert first.locator(".xtick").all_text_contents() == ["a", XSS]
    assert first.locator(".bars .point").count() == 2
    assert second.locator(".hm image").count() == 1  # the heatmap drawn as one raster
    assert page.evaluate("window.Plotly.version") == page.evaluate("Plotly.version") and page.evaluate("window.pwned") is None
    assert page.errors == [] and page.external_requests == []


def test_a_page_without_figures_carries_no_plotly_js():
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# Nothing to draw")]
    html = reports.export_html(notebook, title="empty")
    assert "nm-plotly" not in html and "Plotly" not in html and len(html.encode()) < 500_000


# ---- slow: real runs through the CLI ---------------------------------------------------------------------------


RUNS = {
    "model_overview": ["-p", "model=induction-2l", "-p", f"prompt={PROMPT} {XSS}", "-p", "score_batch=2"],
    "attention": ["-p", "model=induction-2l", "-p", f"prompts={json.dumps([PROMPT, XSS, 'a b c a b c'])}"],
}
"""Small parameters for the templates that take them; the others run with their defaults (small by design)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every template run once by the CLI, its executed notebook kept: {template: (html path, notebook path, seconds)}."""
    folder = tmp_path_factory.mktemp("reports")
    done = {}
    for template in NAMES:
        out, notebook = folder / f"{template}.html", folder / f"{template}.ipynb"
        started = time.perf_counter()
        assert main(["report", template, *RUNS.get(template, []), "-o", str(out), "--notebook", str(notebook)]) == 0
        done[template] = (out, notebook, time.perf_counter() - started)
    return done


@pytest.mark.slow
def test_reports_are_single_offline_files(built):
    for template, (path, notebook, seconds) in built.items():
        html = path.read_text(encoding="utf-8")
        print(f"{template}: {seconds:.1f} s, {len(html.encode()) / 1e6:.2f} MB")
        assert html.count('id="nm-plotly-js"') == (html.count('class="nm-plotly"') > 0), f"{template}: plotly.js not once"
        assert not re.search(r"<script[^>]+\bsrc=", html), f"{template} loads a script"
        assert not re.search(r"<link[^>]+href=[\"']?https?:", html), f"{template} loads a stylesheet"
        assert "require.js" not in html and "MathJax.Hub" not in html and "widget-view+json" not in html
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == [path.name]


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("template", NAMES)
def test_each_executed_report_validates_under_nbval(built, template):
    """The notebook a report kept re-runs under nbval with the same outputs (as the tutorials do): the templates are
    deterministic for their parameters, and the kept notebook opens and runs in an ordinary Jupyter kernel."""
    from test_notebooks import _kernel_environment, run_nbval

    notebook = built[template][1]
    assert json.loads(notebook.read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"] == "python3"
    with _kernel_environment() as env:
        result = run_nbval(notebook, {**env, "NEURONMAP_WIDGETS": "0"}, cwd=notebook.parent)
    assert result.returncode == 0, f"{template}: nbval found outputs that differ\n{result.stdout[-20000:]}\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.browser
def test_model_overview_shows_every_section_offline(built, page):
    page.goto(built["model_overview"][0].as_uri())
    page.wait_for_selector(".nm-attn[data-ready]", timeout=15_000)
    model = nm.load("induction-2l")
    prompt = f"{PROMPT} {XSS}"

    # parameters: the total is the model's own count
    tables = page.locator(".nm-table")
    captions = [c.strip() for c in page.locator(".nm-table .nm-caption").all_inner_texts()]
    total = sum(p.numel() for p in model.module.parameters())
    assert f"{total:,} parameters in induction-2l" in captions
    parts = tables.filter(has_text="parameters in induction-2l").locator("tbody tr").all_inner_texts()
    tied = model.module.lm_head.weight.numel()  # the unembedding is the embedding, counted once
    assert parts[1].split("\t")[:2] == ["lm_head", f"0 (+{tied:,} tied above)"]

    # hook points: every name, with the shape one run on the prompt gives
    trace = model.run(prompt, capture=model.hook_names)
    hook_table = tables.filter(has_text="hook points; shapes for one prompt")
    rows = hook_table.locator("tbody tr").all_inner_texts()
    assert [row.split("\t")[0] for row in rows] == model.hook_names
    shapes = {row.split("\t")[0]: row.split("\t")[1] for row in rows}
    assert all(shapes[name] == str(list(trace[name].shape)) for name in model.hook_names)

    # head scores: six heatmaps, one per score, each with the values the library gives for the same input
    patterns = nm.attention(model, nm.repeated_random_tokens(model, batch=2))
    heatmaps = page.locator(".nm-heatmap")
    assert heatmaps.count() == len(nm.SCORES) == 6
    titles = heatmaps.locator(".nm-hm-title").all_inner_texts()
    for kind, title in zip(nm.SCORES, titles):
        assert title.startswith(f"{kind} score per head — induction-2l"), title
        layer, head, value = patterns.head_scores(kind).top(1)[0]
        assert page.get_by_text(f"Highest {kind.replace('_', '-')} score: head {layer}.{head} ({value:.2f}).").count() == 1

    # the same scores as one interactive plotly figure: a panel per score, drawn offline by the embedded plotly.js
    page.wait_for_selector(".nm-plotly .js-plotly-plot .main-svg", timeout=20_000)
    figure = page.locator(".nm-plotly")
    assert figure.count() == 1
    assert figure.locator(".gtitle").text_content() == "head scores — induction-2l"
    assert figure.locator(".annotation-text").all_text_contents() == list(nm.SCORES)  # the panels' titles
    assert figure.locator(".hm image").count() == len(nm.SCORES)
    assert figure.locator(".colorbar").count() == len(nm.SCORES)  # a scale per score: their ranges differ

    # attention: the viewer rendered, with one token per prompt token
    tokens = model.to_str_tokens(prompt)
    assert page.locator(".nm-attn .nm-token").count() == len(tokens)
    assert "<unk>" in page.locator(".nm-attn .nm-token").all_inner_texts()

    # logit lens: a layer × position grid; its last row's top tokens are the model's own next-token predictions
    lens = page.locator(".nm-lens")
    assert lens.count() == 1
    grid_rows = lens.locator("tbody tr")
    assert grid_rows.count() == 3  # embed, 0, 1
    with torch.no_grad():
        predicted = model.module(**model.tokenizer(prompt, return_tensors="pt")).logits[0].argmax(-1)
    last = grid_rows.nth(2).locator("td").all_inner_texts()
    assert [cell.strip() for cell in last] == [t.strip() for t in model.to_str_tokens(predicted)]

    # the prompt stays text; nothing left the machine; no script error
    assert page.evaluate("window.pwned") is None
    assert XSS in page.locator("body").inner_text()
    assert page.errors == [] and page.external_requests == []


@pytest.mark.slow
@pytest.mark.browser
def test_attention_report_shows_the_prompts_views_and_scores_offline(built, page):
    page.goto(built["attention"][0].as_uri())
    page.wait_for_selector(".nm-attn[data-ready]", timeout=15_000)
    model = nm.load("induction-2l")
    prompts = [PROMPT, XSS, "a b c a b c"]
    prompt_rows = page.locator(".nm-table", has_text="3 prompts").locator("tbody tr").all_inner_texts()
    assert [row.split("\t", 1)[1] for row in prompt_rows] == prompts
    assert page.locator(".nm-attn").count() == 1
    patterns = nm.attention(model, prompts)
    titles = page.locator(".nm-heatmap .nm-hm-title").all_inner_texts()
    assert [title.split(" score per head")[0] for title in titles] == list(nm.SCORES)
    for kind in nm.SCORES:
        layer, head, value = patterns.head_scores(kind).top(1)[0]
        assert page.get_by_text(f"Highest {kind.replace('_', '-')} score: head {layer}.{head} ({value:.2f}).").count() == 1
    assert page.evaluate("window.pwned") is None
    assert page.errors == [] and page.external_requests == []


@pytest.mark.slow
def test_a_failing_cell_is_named_and_its_notebook_kept(capsys, tmp_path):
    out = tmp_path / "report.html"
    environment = dict(os.environ)
    assert main(["report", "attention", "-p", "prompts=[]", "-o", str(out)]) == 1
    assert dict(os.environ) == environment  # the temporary kernel's variables are gone, even after a failure
    err = report_error_line(capsys)
    partial = tmp_path / "report.html.partial.ipynb"
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]
    cells = json.loads(partial.read_text(encoding="utf-8"))["cells"]
    failed = [i for i, cell in enumerate(cells) if any(o["output_type"] == "error" for o in cell.get("outputs", []))]
    assert len(failed) == 1
    first_line = "".join(cells[failed[0]]["source"]).splitlines()[0]
    assert err.startswith(f"neuronmap report: error: cell {failed[0]} failed ({first_line!r}): ValueError: prompts must")
    assert err.endswith(f"kept at {partial}")


@pytest.mark.slow
def test_a_model_that_cannot_be_loaded_is_one_line_and_no_html(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "report.html"
    missing = tmp_path / "no-such-model"
    assert main(["report", "model_overview", "-p", f"model={missing}", "-o", str(out)]) == 1
    err = report_error_line(capsys)
    assert "LoadError: directory" in err and str(missing) in err
    assert not out.exists() and (tmp_path / "report.html.partial.ipynb").exists()


@pytest.mark.slow
def test_a_failed_run_leaves_an_earlier_report_whole(capsys, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("<html>earlier</html>")
    assert main(["report", "attention", "-p", "prompts=[]", "-o", str(out)]) == 1
    assert out.read_text() == "<html>earlier</html>"


@pytest.mark.slow
def test_the_wheel_ships_the_templates_and_runs_a_report_writing_nothing_into_home(installed_wheel, tmp_path):
    shipped = sorted(path.name for path in (installed_wheel / "neuronmap" / "notebooks").glob("*.ipynb"))
    assert shipped == [path.name for path in TEMPLATES]
    for path in TEMPLATES:
        assert (installed_wheel / "neuronmap" / "notebooks" / path.name).read_bytes() == path.read_bytes()
    record = next(installed_wheel.glob("neuronmap-*.dist-info/RECORD")).read_text()
    assert "neuronmap/notebooks/model_overview.ipynb" in record and "neuronmap/reports/page.py" in record

    home = tmp_path / "home"
    home.mkdir()
    env = {"PYTHONPATH": str(installed_wheel), "PATH": os.environ["PATH"], "HOME": str(home), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "from neuronmap import reports; print(reports.templates_dir())"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(installed_wheel / "neuronmap" / "notebooks"), where.stderr[-2000:]
    out = tmp_path / "overview.html"
    result = subprocess.run(
        [sys.executable, "-m", "neuronmap", "report", "model_overview", "-p", "model=induction-2l", "-o", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"wrote {out} (") and result.stderr == ""
    html = out.read_text(encoding="utf-8")
    assert html.count('class="nm-heatmap"') == 6 and 'class="nm-lens"' in html and "hook points; shapes" in html
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


@pytest.mark.slow
def test_an_encoder_without_an_unembedding_says_so_in_the_lens_section(tmp_path):
    from conftest import make_model, word_tokenizer

    folder = tmp_path / "bert"
    make_model("bert").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    model = nm.load(str(folder))
    with pytest.raises(nm.WeightError) as refused:
        nm.analysis.logit_lens(model, "the cat sat")
    out = tmp_path / "bert.html"
    assert main(["report", "model_overview", "-p", f"model={folder}", "-p", "prompt=the cat sat", "-o", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    lens_section = html.split('id="Logit-lens"', 1)[1]
    assert 'class="nm-lens"' not in html
    assert f"<b>No logit lens for this model:</b> {nm.display.escape(str(refused.value))}" in lens_section
    tokens = len(model.to_str_tokens("the cat sat"))
    assert html.count('class="nm-heatmap"') == 6 and f"hook points; shapes for one prompt of {tokens} tokens" in html
