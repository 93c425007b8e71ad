"""pyproject.toml's dependency ranges: the core is capped below its next major, and what is installed fits."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# the project's fixed core, plus the two libraries the data path calls directly (pyproject's policy comment)
CAPPED = ("torch", "open-clip-torch", "transformers", "accelerate", "webdataset", "decord", "faiss-cpu", "numpy", "av")
UPPER_BOUNDS = ("<", "<=", "==", "===", "~=")


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


@pytest.mark.parametrize("name", CAPPED)
def test_core_dependencies_have_an_upper_bound(name):
    requirement = dependencies().get(canonicalize_name(name))
    assert requirement is not None, f"{name} is missing from pyproject.toml's dependencies"
    bounds = [spec for spec in requirement.specifier if spec.operator in UPPER_BOUNDS]
    assert bounds, f"{requirement} has no upper bound; cap it below the next major release"


def test_installed_versions_satisfy_the_declared_ranges():
    outside = []
    for name, requirement in dependencies().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            outside.append(f"{requirement}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            outside.append(f"{requirement}: {installed} installed")
    assert not outside, "installed versions outside pyproject.toml's ranges: " + "; ".join(outside)
