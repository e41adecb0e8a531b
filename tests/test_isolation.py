"""The test session keeps Jupyter's and IPython's files out of the user's home (signatures, secrets, history)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbformat.sign import NotebookNotary

HOME_FOLDERS = [Path.home() / ".local" / "share" / "jupyter", Path.home() / ".jupyter", Path.home() / ".ipython"]


def snapshot() -> dict[str, float]:
    """Every file under the home folders Jupyter and IPython use by default, with its modification time."""
    return {str(path): path.stat().st_mtime for folder in HOME_FOLDERS if folder.exists() for path in folder.rglob("*")}


def test_jupyter_and_ipython_folders_point_into_the_sessions_temporary_folder(jupyter_home):
    from IPython.paths import get_ipython_dir
    from jupyter_core.paths import jupyter_config_dir, jupyter_data_dir, jupyter_runtime_dir

    for folder in (jupyter_data_dir(), jupyter_config_dir(), jupyter_runtime_dir(), get_ipython_dir()):
        assert Path(folder).is_relative_to(jupyter_home), folder
        assert not Path(folder).is_relative_to(Path.home()) or Path.home().is_relative_to(jupyter_home)


@pytest.mark.slow
def test_running_and_signing_a_notebook_writes_nothing_in_the_home(tmp_path):
    import papermill

    before = snapshot()
    source, executed = tmp_path / "tiny.ipynb", tmp_path / "executed.ipynb"
    cells = [nbformat.v4.new_code_cell("x = 1 + 1\nx")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}), source)
    papermill.execute_notebook(str(source), str(executed), kernel_name="python3", progress_bar=False)
    notary = NotebookNotary()
    notary.sign(nbformat.read(executed, as_version=4))  # what trusting a notebook writes: nbsignatures.db
    assert os.path.exists(notary.db_file) and not Path(notary.db_file).is_relative_to(Path.home() / ".local")
    assert snapshot() == before
