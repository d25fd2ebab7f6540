"""Release hygiene: one version everywhere, a changelog and a citation, project URLs, docs of the current format."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import prolip
from prolip.files.delta import FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_everywhere():
    project = _pyproject()["project"]
    assert "version" in project["dynamic"] and "version" not in project  # read from prolip/_version.py alone
    assert importlib.metadata.version("prolip") == prolip.__version__
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(prolip.__version__)}$", citation, re.M)
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top and top.group(1) == prolip.__version__


def test_the_citation_names_the_paper():
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    paper = citation["preferred-citation"]
    assert citation["cff-version"] == "1.2.0" and "2410.05270" in paper["journal"]
    assert paper["authors"][0]["family-names"] == "Fahes"


def test_project_urls_and_the_documented_format():
    urls = _pyproject()["project"]["urls"]
    assert urls["Paper"] == "https://arxiv.org/abs/2410.05270" and "astra-vision/ProLIP" in urls["Authors' code"]
    fmt = (ROOT / "docs" / "format.md").read_text()
    assert fmt.startswith(f"# Delta file format (version {FORMAT_VERSION})")
    assert f"`format_version` | `{FORMAT_VERSION}`" in fmt


def test_generated_outputs_are_not_tracked():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "build/" in ignored  # the miniature suite, the feature cache, the docs site
