"""`neuronmap.course.solve` writes a tutorial's solved copy from its tag-driven solution file, or says what does not match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuronmap.course import SolutionError, solve
from neuronmap.course.solutions import exercise_tags, read_solutions, solution_path


def _cell(source: str, tags: list[str] | None = None, cell_type: str = "code") -> dict:
    cell = {"cell_type": cell_type, "id": f"c{abs(hash(source)) % 10**8}", "metadata": {"tags": tags} if tags else {}, "source": source}
    if cell_type == "code":
        cell.update(execution_count=1, outputs=[{"output_type": "stream", "name": "stdout", "text": "✗ Not yet\n"}])
    return cell


def _notebook(folder: Path, *cells: dict, name: str = "lesson.ipynb") -> Path:
    path = folder / name
    path.write_text(json.dumps({"cells": list(cells), "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def _solutions(notebook: Path, text: str) -> Path:
    path = solution_path(notebook)
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_the_solution_file_sits_in_solutions_beside_the_notebook(tmp_path):
    assert solution_path(tmp_path / "02_attention_heads.ipynb") == tmp_path / "solutions" / "02_attention_heads.py"


def test_solve_replaces_each_tagged_cell_and_clears_outputs(tmp_path):
    notebook = _notebook(
        tmp_path,
        _cell("# Lesson", cell_type="markdown"),
        _cell("x = 1"),
        _cell("answer = ...  # YOUR ANSWER", ["exercise-1"]),
        _cell("check(answer)"),
        _cell("def f():\n    ...  # YOUR ANSWER", ["exercise-2", "slow"]),
    )
    _solutions(notebook, "# Solutions to lesson.ipynb.\n\n# %% exercise-1\nanswer = x + 1\n\n# %% exercise-2\ndef f():\n    return 2\n")
    solved = json.loads(solve(notebook, tmp_path / "out" / "solved.ipynb").read_text())
    sources = [cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"]) for cell in solved["cells"]]
    assert sources == ["# Lesson", "x = 1", "answer = x + 1", "check(answer)", "def f():\n    return 2"]
    assert solved["cells"][4]["metadata"]["tags"] == ["exercise-2", "slow"]
    code = [cell for cell in solved["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert json.loads(notebook.read_text())["cells"][2]["source"] == "answer = ...  # YOUR ANSWER"  # the student copy is untouched
    assert exercise_tags(notebook) == ["exercise-1", "exercise-2"]


def test_the_student_copy_is_never_overwritten(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]))
    _solutions(notebook, "# %% exercise-1\na = 1\n")
    with pytest.raises(SolutionError, match="would overwrite the student copy"):
        solve(notebook, tmp_path / "." / "lesson.ipynb")
    assert "a = ..." in notebook.read_text()


def test_a_tag_without_a_solution_is_named(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]), _cell("b = ...", ["exercise-2"]))
    _solutions(notebook, "# %% exercise-1\na = 1\n")
    with pytest.raises(SolutionError, match=r"no solution in .*lesson\.py for the cells tagged exercise-2"):
        solve(notebook, tmp_path / "solved.ipynb")
    assert not (tmp_path / "solved.ipynb").exists()


def test_a_solution_without_a_cell_is_named(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]))
    _solutions(notebook, "# %% exercise-1\na = 1\n# %% exercise-3\nc = 3\n")
    with pytest.raises(SolutionError, match=r"no cell of .*lesson\.ipynb is tagged exercise-3"):
        solve(notebook, tmp_path / "solved.ipynb")


def test_two_cells_with_one_tag_are_refused(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]), _cell("b = ...", ["exercise-1"]))
    _solutions(notebook, "# %% exercise-1\na = 1\n")
    with pytest.raises(SolutionError, match="two cells are tagged exercise-1"):
        solve(notebook, tmp_path / "solved.ipynb")


def test_a_tagged_markdown_cell_is_refused(tmp_path):
    notebook = _notebook(tmp_path, _cell("Exercise 1", ["exercise-1"], cell_type="markdown"))
    _solutions(notebook, "# %% exercise-1\na = 1\n")
    with pytest.raises(SolutionError, match="not a code cell"):
        solve(notebook, tmp_path / "solved.ipynb")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a = 1\n# %% exercise-1\nb = 2\n", r"solutions\.py:1: code before the first"),
        ("# %% exercise-1\na = 1\n# %% exercise-1\nb = 2\n", r"solutions\.py:3: a second block 'exercise-1'"),
        ("# %% answer\na = 1\n", r"solutions\.py:1: block 'answer' should be named exercise-N"),
        ("# %% exercise-1\n\n# %% exercise-2\nb = 2\n", "the blocks exercise-1 hold no code"),
    ],
)
def test_a_malformed_solution_file_is_refused_with_its_line(tmp_path, text, message):
    path = tmp_path / "solutions.py"
    path.write_text(text)
    with pytest.raises(SolutionError, match=message):
        read_solutions(path)


def test_a_missing_solution_file_is_named(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]))
    with pytest.raises(SolutionError, match=r"no solution file .*solutions/lesson\.py"):
        solve(notebook, tmp_path / "solved.ipynb")


def test_the_command_line_writes_the_solved_copy_or_exits_2(tmp_path):
    notebook = _notebook(tmp_path, _cell("a = ...", ["exercise-1"]))
    other = tmp_path / "other.py"
    other.write_text("# %% exercise-1\na = 1\n")
    command = [sys.executable, "-m", "neuronmap.course", "solve", str(notebook), str(tmp_path / "solved.ipynb")]
    done = subprocess.run([*command, "--solutions", str(other)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "solved.ipynb").read_text())["cells"][0]["source"] == "a = 1"
    refused = subprocess.run(command, capture_output=True, text=True)  # no solutions/lesson.py
    assert refused.returncode == 2
    assert "error: no solution file" in refused.stderr
