"""The `neuronmap` command line: every command's help, the zoo and hook listings against the library's own answers,
and bad input as one line on stderr with exit status 1 (2 for usage errors)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import neuronmap as nm
from neuronmap import zoo
from neuronmap.cli import main

COMMANDS = [[], ["extract"], ["zoo"], ["zoo", "list"], ["zoo", "card"], ["zoo", "train"], ["hooks"], ["report"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "neuronmap")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: neuronmap") and len(out.splitlines()) > 3


def test_the_entry_point_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "neuronmap", "zoo", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "list" in result.stdout and "card" in result.stdout


def test_zoo_list_names_every_entry_and_card_prints_the_cards_json(capsys):
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == [entry.name for entry in zoo.list()]
    assert lines[2].split()[:3] == ["ioi", "GPT2LMHeadModel", f"{zoo.card('ioi')['parameters']:,}"]
    assert main(["zoo", "card", "ioi-resid0"]) == 0
    assert json.loads(capsys.readouterr().out) == zoo.card("ioi-resid0")


def test_hooks_lists_every_hook_point_with_its_shape(capsys):
    assert main(["hooks", "induction-2l", "--input", "a b c d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = nm.load("induction-2l")
    trace = model.run("a b c d", capture=model.hook_names)
    assert lines[0] == f"induction-2l: {len(model.hook_names)} hook points; shapes for one input of 5 tokens"
    assert [line.split()[0] for line in lines[1:]] == model.hook_names
    shapes = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert shapes["blocks.1.attn.hook_pattern"] == str(list(trace["blocks.1.attn.hook_pattern"].shape))
    assert shapes["blocks.0.hook_resid_post"] == "[1, 5, 128]"


def test_bad_input_is_one_line_on_stderr_with_status_1_and_usage_errors_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown model name is not looked up on the hub here
    assert main(["zoo", "card", "iio"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuronmap zoo: error: unknown zoo model 'iio'") and "ioi" in err
    assert main(["hooks", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuronmap hooks: error:")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("taken")
    assert main(["zoo", "train", "ioi", "--out", str(tmp_path / "full")]) == 1
    assert "is not empty: choose a new directory with --out" in capsys.readouterr().err
    for usage in (["zoo"], ["zoo", "train", "gpt5"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit:
            main(usage)
        assert exit.value.code == 2


def test_debug_shows_the_traceback():
    with pytest.raises(nm.LoadError, match="unknown zoo model 'iio'"):
        main(["zoo", "card", "iio", "--debug"])


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "zoo" in capsys.readouterr().out
