"""The committed notebooks are generated from tools/nbsrc and follow the chapter layout."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import nbbuild  # noqa: E402

SOURCES = sorted(path.stem for path in (ROOT / "tools" / "nbsrc").glob("*.py"))


@pytest.mark.parametrize("name", SOURCES)
def test_notebook_matches_its_source(name):
    committed = (ROOT / "notebooks" / f"{name}.ipynb").read_text()
    assert committed == nbbuild.render(name), f"run: python tools/nbbuild.py {name}"


@pytest.mark.parametrize("name", SOURCES)
def test_notebook_has_title_then_parameters_and_no_outputs(name):
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    title, colab, parameters = notebook.cells[:3]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert "google.colab" in colab.source and "remove-cell" in colab.metadata["tags"]
    assert parameters.metadata.get("tags") == ["parameters"]
    headings = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    assert sum(line.startswith("# ") for h in headings for line in h.splitlines()) == 1
    for section in ("## Overview", "## Prerequisites", "## Summary", "## What's next?"):
        assert any(section in h for h in headings), section
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", SOURCES)
def test_readme_links_every_notebook_to_colab(name):
    repository = nbbuild.repository_url().removeprefix("https://github.com/")
    link = f"https://colab.research.google.com/github/{repository}/blob/main/notebooks/{name}.ipynb"
    assert link in (ROOT / "README.md").read_text()
