"""The project files agree with each other: the licence pyproject.toml names is the one at the
root, and the version is the same in the code, pyproject.toml, CITATION.cff and the changelog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import zfvis

REPO = Path(__file__).resolve().parents[1]


def test_license_is_the_one_pyproject_names() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert project["license"]["text"] == "MIT" and text.startswith("MIT License")
    assert "Copyright (c)" in text and "zfvis developers" in text


def test_the_version_is_one_everywhere() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == zfvis.__version__
    cff = (REPO / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(r"^version: (\S+)$", cff, flags=re.M).group(1) == zfvis.__version__  # type: ignore[union-attr]
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{zfvis.__version__}] - " in changelog and "## [Unreleased]" in changelog


def test_citation_cites_the_software_and_the_paper() -> None:
    cff = (REPO / "CITATION.cff").read_text(encoding="utf-8")
    assert cff.startswith("cff-version: 1.2.0") and "type: software" in cff and "license: MIT" in cff
    assert "Visualizing and Understanding Convolutional Networks" in cff and "10.1007/978-3-319-10590-1_53" in cff
    try:
        import yaml
    except ImportError:  # PyYAML comes with mkdocs (the test extra); the text checks above still ran
        return
    data = yaml.safe_load(cff)
    assert data["references"][0]["authors"][0]["family-names"] == "Zeiler"


def test_the_test_extra_brings_the_docs_tools() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(extras["docs"]) <= set(extras["test"])  # CI installs .[test] and builds the site
