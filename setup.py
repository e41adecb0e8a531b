"""Package list for setuptools (everything else is in pyproject.toml): the `neuronmap*` packages, plus the top-level
`notebooks/` (report templates) shipped inside the wheel as `neuronmap/notebooks`, where `neuronmap.reports` finds
them (in a checkout or an editable install it reads `notebooks/` itself)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["neuronmap*"]), "neuronmap.notebooks"],
    package_dir={"neuronmap.notebooks": "notebooks"},
)
