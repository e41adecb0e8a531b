"""`neuronmap report sae`: the template's parameters and bad input through the CLI; one real run on the zoo's
`ioi-resid0` SAE and `ioi` model whose page, in Chromium with every network request refused, shows the metrics,
density histogram, top features and dashboards that the library computes in this process for the same texts, draws
its plotly chart, and keeps a hostile text and the token `<s>` as text; a folder that is not an SAE, an unknown
name, and SAEs made for another model each stop the report with one line naming the failing cell and no HTML."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

import neuronmap as nm
from neuronmap import reports, zoo
from neuronmap.cli import main
from neuronmap.sae.metrics import DENSITY_BINS
from neuronmap.zoo.recipes import ioi_sae

from conftest import parameters_cell, report_error_line

TEMPLATE = Path(__file__).resolve().parents[1] / "notebooks" / "sae.ipynb"
XSS = "<script>window.pwned=1</script>"
HOSTILE_TEXT = f"Mary and John went to the store. {XSS} John gave a drink to Mary."
TEXTS = [ioi_sae.texts(1, 11)[0], HOSTILE_TEXT, *ioi_sae.texts(40, 12)]
SEED, TOP, BROWSE = 5, 3, 8
DEFAULTS = {"sae": "ioi-resid0", "model": "ioi", "texts": [], "n_texts": 500, "seed": 4321, "top": 6, "order": "max",
            "skip_first": True, "browse": 32}


def _cells() -> list[dict]:
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))["cells"]


# ---- fast: the template and its parameters ---------------------------------------------------------------------


def test_the_template_declares_its_parameters_each_with_a_help_comment():
    lines = parameters_cell(TEMPLATE).splitlines()
    declared = {}
    for line in lines:
        match = re.fullmatch(r"(\w+) = (.+?)  # (.+)", line)
        assert match, f"not `name = literal  # help`: {line!r}"
        declared[match.group(1)] = ast.literal_eval(match.group(2))
    assert declared == DEFAULTS
    listed = reports.templates()["sae"]
    assert {name: p.default for name, p in listed.items()} == DEFAULTS
    assert all(f"# {p.help}" in parameters_cell(TEMPLATE) for p in listed.values())


def test_the_template_reads_as_a_report_and_is_committed_without_outputs():
    cells = _cells()
    assert sum(c["cell_type"] == "markdown" for c in cells) >= 3
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells if c["cell_type"] == "code")


def test_list_shows_the_sae_template_with_its_defaults(capsys):
    assert main(["report", "--list"]) == 0
    out = capsys.readouterr().out
    block = out.split("\nsae\n", 1)[1].split("\n\n")[0]
    lines = [line for line in block.splitlines() if line.startswith("  -p ")][: len(DEFAULTS)]
    parsed = [re.fullmatch(r"  -p (\w+)=…  \((\w+), default (.+?)\): (.+)", line).groups() for line in lines]
    assert [name for name, *_ in parsed] == list(DEFAULTS)
    for (name, kind, shown, _), default in zip(parsed, DEFAULTS.values()):
        assert kind == type(default).__name__
        assert (json.loads(shown) if isinstance(default, (str, list)) else ast.literal_eval(shown)) == default


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["top=many"], "parameter 'top' must be of type int (its default is 6), got 'many'"),
        (["texts=just one"], "parameter 'texts' must be of type list (its default is []), got 'just one'"),
        (["skip_first=maybe"], "parameter 'skip_first' must be of type bool (its default is True), got 'maybe'"),
        (["n_texts=2.5"], "parameter 'n_texts' must be of type int"),
        (["layer=0"], "template 'sae' has no parameter 'layer'; its parameters: " + ", ".join(DEFAULTS)),
        (["sae"], "parameter 'sae' is not key=value"),
    ],
    ids=["int", "list", "bool", "int-not-float", "undeclared", "no-value"],
)
def test_bad_parameters_are_one_line_with_status_1_and_nothing_written(pairs, message, capsys, tmp_path):
    argv = ["report", "sae", *[arg for pair in pairs for arg in ("-p", pair)], "-o", str(tmp_path / "sae.html")]
    assert main(argv) == 1
    assert report_error_line(capsys).startswith(f"neuronmap report: error: {message}")
    assert list(tmp_path.iterdir()) == []


# ---- slow: one real run through the CLI, read in Chromium ------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The report run once by the CLI on the zoo SAE and model, with small parameters and a hostile text."""
    out = tmp_path_factory.mktemp("sae-report") / "sae.html"
    parameters = {"texts": json.dumps(TEXTS), "seed": SEED, "top": TOP, "browse": BROWSE}
    argv = ["report", "sae", *[arg for key, value in parameters.items() for arg in ("-p", f"{key}={value}")], "-o", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def reference():
    """What the library computes in this process for the same SAE, model and texts."""
    model, sae = zoo.load("ioi"), zoo.load_sae("ioi-resid0")
    torch.set_num_threads(1)
    metrics = nm.sae.evaluate(sae, model, TEXTS, context=model.context_length, progress=False)
    stats = nm.sae.feature_statistics(sae, model, TEXTS, seed=SEED, progress=False)
    return model, sae, metrics, stats


def _top_by_max_off_the_first_token(stats) -> tuple[list[int], list[int]]:
    """The latents that fire, by largest activation (ties by index), leaving out those whose largest activation is
    on a sequence's first token: (the first TOP of them, the left-out ones), from the raw per-latent tensors."""
    starts = set(stats.starts[:-1].tolist())
    fired = [(-float(stats.max[i]), int(latent), i) for i, latent in enumerate(stats.latents.tolist()) if stats.count[i] > 0]
    ranked = sorted(fired)
    first = sorted(latent for _, latent, i in ranked if int(stats.top_rows[i, 0]) in starts)
    return [latent for _, latent, _ in ranked if latent not in first][:TOP], first


@pytest.mark.slow
def test_the_report_is_one_offline_page_of_a_few_megabytes(built):
    html = built.read_text(encoding="utf-8")
    assert len(html.encode()) < 5_000_000
    assert not re.search(r"<script[^>]+\bsrc=", html) and not re.search(r"<link[^>]+href=[\"']?https?:", html)
    assert XSS not in html  # the hostile text is in the page only escaped
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_shows_what_the_library_computes(built, reference, page):
    _, sae, metrics, stats = reference
    page.goto(built.as_uri())
    page.wait_for_selector(".nm-plotly .js-plotly-plot .main-svg", timeout=20_000)
    page.wait_for_selector(".nm-sae[data-list]", timeout=15_000)

    # the SAE's settings: its cfg, escaped into a table
    settings = page.locator(".nm-table", has_text="settings of ioi-resid0").locator("tbody tr").all_inner_texts()
    shown = dict(row.split("\t")[:2] for row in settings)
    assert shown["d_in"] == str(sae.cfg.d_in) and shown["d_sae"] == str(sae.cfg.d_sae) and shown["k"] == str(sae.cfg.k)
    assert shown["hook_name"] == sae.cfg.hook_name and shown["architecture"] == sae.cfg.architecture
    assert shown["parameters"] == f"{sum(p.numel() for p in sae.parameters()):,}"

    # the texts, shown as text (the first 8)
    rows = page.locator(".nm-table", has_text=f"{len(TEXTS)} texts").locator("tbody tr").all_inner_texts()
    assert [row.split("\t", 1)[1] for row in rows] == TEXTS[:8]

    # the metrics: the numbers evaluate gives for the same texts
    table = page.locator(".nm-sae-metrics .nm-table")
    assert f"{metrics.tokens:,} tokens" in table.locator(".nm-caption").inner_text()
    values = dict(row.split("\t") for row in table.locator("tbody tr").all_inner_texts())
    number = lambda label: float(values[label].rstrip("%"))
    assert number("L0 (latents active per token)") == pytest.approx(metrics.l0, abs=0.006)
    assert number("MSE (per feature)") == pytest.approx(metrics.mse, rel=1e-3)
    assert number("explained variance") == pytest.approx(metrics.explained_variance, abs=6e-5)
    assert number("dead latents (never fired)") == pytest.approx(100 * metrics.dead_fraction, abs=0.006)
    assert number("CE loss, clean") == pytest.approx(metrics.ce_clean, abs=6e-5)
    assert number("CE loss, SAE spliced in") == pytest.approx(metrics.ce_spliced, abs=6e-5)
    assert number("CE loss recovered") == pytest.approx(metrics.ce_loss_recovered, abs=6e-5)
    assert number("KL(clean ‖ spliced) per token") == pytest.approx(metrics.kl_divergence, rel=1e-3)

    # the density histogram: one bar per bin, their counts the latents that fire, the dead ones said apart
    bars = page.locator(".nm-sae-metrics .nm-hist svg rect title").all_text_contents()
    assert len(bars) == DENSITY_BINS
    assert sum(int(bar.rsplit(": ", 1)[1].replace(",", "")) for bar in bars) == int((metrics.density > 0).sum())
    assert f"{int((metrics.density == 0).sum()):,} dead latents not shown" in page.locator(".nm-sae-metrics").inner_text()

    # the top features: the criterion printed, and one dashboard each, in order, for the latents ranked here
    top, first = _top_by_max_off_the_first_token(stats)
    body = page.locator("body").inner_text()
    assert f"The top {TOP} features by largest activation: latents {', '.join(map(str, top))}" in body
    if first:
        assert f"whose largest activation is on a text's first token ({', '.join(map(str, first))})" in body
    dashboards = page.locator(".nm-sae[data-ready]:not([data-list])")
    assert [dashboards.nth(k).get_attribute("data-ready") for k in range(dashboards.count())] == [str(t) for t in top]
    for k, latent in enumerate(top):
        drawn = dashboards.nth(k).locator(".nm-sae-context").evaluate_all("""lines => lines.map((line) => {
          const spans = [...line.querySelectorAll('.nm-sae-token')];
          return { texts: spans.map(s => s.textContent), acts: spans.map(s => Number(s.dataset.act)) };
        })""")
        expected = stats.top_contexts(latent) + [c for interval in stats.intervals(latent) for c in interval.contexts]
        assert len(drawn) == len(expected) > 0
        for line, context in zip(drawn, expected):
            assert line["texts"] == [t.replace("\n", "\u21b5") for t in context.tokens]
            assert line["acts"] == pytest.approx(context.activations, rel=1e-3, abs=1e-3)  # sent as float16
    summary = page.locator(".nm-table", has_text=f"the top {TOP} features by largest activation").locator("tbody tr")
    for row, latent in zip(summary.all_inner_texts(), top):
        cells = row.split("\t")
        assert cells[0] == str(latent) and cells[1] == f"{float(stats.max[stats.index(latent)]):.3f}"

    # the plotly chart: one point per latent that fires
    alive = int((stats.count > 0).sum())
    assert page.locator(".nm-plotly .js-plotly-plot .main-svg").count() >= 1
    assert page.locator(".nm-plotly .scatterlayer .point").count() == alive
    assert f"{alive} of {sae.cfg.d_sae} latents fire on these texts" in page.locator(".nm-plotly").inner_text()

    # the browser: every latent listed, by largest activation (start-token latents included), BROWSE dashboards
    browser = page.locator(".nm-sae[data-list]")
    assert browser.get_attribute("data-list") == str(sae.cfg.d_sae)
    by_max = sorted(stats.latents.tolist(), key=lambda latent: (-float(stats.max[stats.index(latent)]), latent))
    listed = browser.locator(".nm-sae-table tbody tr").evaluate_all("rows => rows.map(r => Number(r.dataset.latent))")
    assert listed[:BROWSE] == by_max[:BROWSE]
    assert f"dashboards of {BROWSE} of {sae.cfg.d_sae} latents embedded" in browser.inner_text()

    # the hostile text stays text, and so does the start token `<s>` in the contexts (no <s> element appears);
    # nothing ran, nothing was fetched
    assert page.evaluate("window.pwned") is None
    assert XSS in body
    tokens = page.locator(".nm-sae-token").evaluate_all("spans => spans.map(s => s.textContent)")
    assert "<s>" in tokens and page.locator("s, script[src]").count() == 0
    assert page.errors == [] and page.external_requests == []


# ---- slow: an SAE that does not fit stops the report -----------------------------------------------------------


def _fails_in_cell(capsys, tmp_path, parameters: list[str], marker: str) -> str:
    """Run the report, expect status 1 and no HTML; the one error line names the cell holding `marker` (the
    template's cell that raised), as the kept partial notebook shows it; returns the line."""
    out = tmp_path / "sae.html"
    argv = ["report", "sae", *[arg for pair in parameters for arg in ("-p", pair)], "-o", str(out)]
    capsys.readouterr()  # what the test printed before (a model's loading bar)
    assert main(argv) == 1
    err = report_error_line(capsys)
    assert not out.exists()
    cells = json.loads((tmp_path / "sae.html.partial.ipynb").read_text(encoding="utf-8"))["cells"]
    failed = [i for i, c in enumerate(cells) if any(o["output_type"] == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and marker in "".join(cells[failed[0]]["source"])
    first_line = "".join(cells[failed[0]]["source"]).splitlines()[0]
    assert err.startswith(f"neuronmap report: error: cell {failed[0]} failed ({first_line!r}): ")
    return err


@pytest.mark.slow
def test_a_folder_that_is_not_an_sae_fails_naming_the_cell(capsys, tmp_path):
    folder = tmp_path / "not-an-sae"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    err = _fails_in_cell(capsys, tmp_path, [f"sae={folder}", "n_texts=5"], "nm.sae.SAE.load(")
    assert f"SAEError: {folder} is not an SAE folder: it has no cfg.json and no sae_weights.safetensors" in err


@pytest.mark.slow
def test_an_unknown_sae_name_fails_naming_the_zoo(capsys, tmp_path):
    err = _fails_in_cell(capsys, tmp_path, ["sae=ioi-resid9", "n_texts=5"], "nm.sae.SAE.load(")
    assert "SAEError: no SAE at 'ioi-resid9': neither a folder nor a zoo SAE (ioi-resid0)" in err


@pytest.mark.slow
def test_an_sae_of_another_width_fails_saying_both_widths(capsys, tmp_path):
    from conftest import make_model, word_tokenizer

    folder = tmp_path / "gpt2-small-random"
    make_model("gpt2").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    model = nm.load(str(folder))
    width = model.run("the cat sat", capture="blocks.0.hook_resid_post")["blocks.0.hook_resid_post"].shape[-1]
    assert width != zoo.load_sae("ioi-resid0").cfg.d_in
    err = _fails_in_cell(capsys, tmp_path, [f"model={folder}", "texts=[\"the cat sat\"]"], "model.resolve(hook)")
    assert (f"SAEError: the SAE (made for 'ioi') reads d_in=128 features at 'blocks.0.hook_resid_post', but "
            f"'{folder}' carries {width} there") in err


@pytest.mark.slow
def test_an_sae_of_a_hook_the_model_lacks_fails_naming_the_hook(capsys, tmp_path):
    folder = tmp_path / "deep-sae"
    nm.sae.SAE("topk", d_in=128, d_sae=64, k=4, hook_name="blocks.5.hook_resid_post", model_name="deeper").save(folder)
    assert "blocks.5.hook_resid_post" not in zoo.load("ioi").hook_names
    err = _fails_in_cell(capsys, tmp_path, [f"sae={folder}", "n_texts=5"], "model.resolve(hook)")
    assert "SAEError: the SAE (made for 'deeper') reads 'blocks.5.hook_resid_post', which 'ioi' does not have" in err


@pytest.mark.slow
def test_an_unknown_order_fails_before_anything_loads(capsys, tmp_path):
    err = _fails_in_cell(capsys, tmp_path, ["order=latest"], 'if order not in ("max", "density")')
    assert "InputError: order must be \"max\" or \"density\", got 'latest'" in err
