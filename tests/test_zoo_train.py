"""`python -m neuronmap.zoo.train NAME` writes a new directory; only `--replace-shipped` touches the shipped model."""

from __future__ import annotations

import pytest

from neuronmap.zoo import train
from neuronmap.zoo.recipes import ioi


@pytest.fixture
def fake_recipe(monkeypatch, tmp_path):
    """The ioi recipe replaced by one that writes a marker file, and a stand-in for the package's models folder."""
    shipped = tmp_path / "package-models"
    (shipped / "ioi").mkdir(parents=True)
    (shipped / "ioi" / "model.safetensors").write_text("shipped")

    def fake_train(out, quick=False, seed=0):
        (out / "model.safetensors").write_text(f"retrained seed {seed}")
        return {"name": "ioi", "mechanisms": []}

    monkeypatch.setattr(ioi, "train", fake_train)
    monkeypatch.setattr(train, "MODELS_DIR", shipped)
    monkeypatch.chdir(tmp_path)
    return shipped / "ioi"


def test_by_default_a_new_directory_is_written_and_the_shipped_model_is_untouched(fake_recipe, tmp_path):
    assert train.main(["ioi"]) == 0
    assert (tmp_path / "ioi-retrained" / "model.safetensors").read_text() == "retrained seed 0"
    assert (fake_recipe / "model.safetensors").read_text() == "shipped"


def test_out_chooses_the_directory(fake_recipe, tmp_path):
    train.main(["ioi", "--out", str(tmp_path / "mine"), "--seed", "3"])
    assert (tmp_path / "mine" / "model.safetensors").read_text() == "retrained seed 3"
    assert (fake_recipe / "model.safetensors").read_text() == "shipped"


def test_the_shipped_directory_or_a_non_empty_one_is_refused_without_the_flag(fake_recipe, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["ioi", "--out", str(fake_recipe)])
    assert "pass --replace-shipped" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        train.main(["ioi", "--out", str(tmp_path / "full")])
    assert "is not empty" in capsys.readouterr().err
    assert (fake_recipe / "model.safetensors").read_text() == "shipped"


def test_replace_shipped_overwrites_the_shipped_model(fake_recipe):
    train.main(["ioi", "--replace-shipped"])
    assert (fake_recipe / "model.safetensors").read_text() == "retrained seed 0"
