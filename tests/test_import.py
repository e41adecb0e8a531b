"""`import neuronmap` stays light: heavy optional libraries load only when first used."""

import subprocess
import sys


def test_import_does_not_pull_heavy_libraries():
    heavy = ["plotly", "sklearn", "h5py", "anywidget", "ipywidgets", "transformers", "pandas", "scipy"]
    code = f"import neuronmap, sys; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
