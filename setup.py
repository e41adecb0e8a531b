"""Package list for setuptools (everything else is in pyproject.toml): the `neuronmap*` packages, plus two top-level
folders shipped inside the wheel: `notebooks/` (report templates) as `neuronmap/notebooks`, where `neuronmap.reports`
finds them, and `widgets/` (the front ends) as `neuronmap/widgets`, where `neuronmap.widget` finds them. In a checkout
or an editable install both read the top-level folders themselves."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["neuronmap*"]), "neuronmap.notebooks", "neuronmap.widgets"],
    package_dir={"neuronmap.notebooks": "notebooks", "neuronmap.widgets": "widgets"},
)
