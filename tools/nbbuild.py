"""Write a study notebook from a plain-text source (``tools/nbsrc/NN_name.py``).

The sources use ``# %%`` cell markers: ``# %% [markdown]`` for prose (each line
starting ``# ``), ``# %% tags=["parameters"]`` for the papermill parameters cell. A cell
that installs neonb when the notebook runs on Google Colab is added after the title.
Keeping the sources as text makes notebook changes reviewable; the ``.ipynb`` files in
``notebooks/`` are generated from them, committed without outputs, and checked by a test
to be up to date.

Usage: python tools/nbbuild.py [NAME ...]   (default: every source)
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "tools" / "nbsrc"
COLAB_SETUP = """\
# On Google Colab, install neonb first; elsewhere `make study` has set everything up.
import sys

if "google.colab" in sys.modules:
    %pip install --quiet "neonb @ git+{repository}"
"""


def repository_url() -> str:
    """The project's repository, from ``[project.urls]`` in ``pyproject.toml``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def colab_setup_cell() -> nbformat.NotebookNode:
    """The code cell that installs neonb on Colab; the book removes it from its pages."""
    cell = nbformat.v4.new_code_cell(COLAB_SETUP.format(repository=repository_url()).rstrip())
    cell["id"] = "colab-setup"
    cell.metadata["tags"] = ["remove-cell"]
    return cell


MARKER = re.compile(r"^# %%(?P<kind> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")


def parse(text: str) -> nbformat.NotebookNode:
    """Turn ``# %%``-delimited text into a notebook without outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    cells: list[tuple[bool, list[str], list[str]]] = []
    for line in text.splitlines():
        match = MARKER.match(line)
        if match:
            tags = json.loads(match["tags"]) if match["tags"] else []
            cells.append((bool(match["kind"]), tags, []))
        elif cells:
            cells[-1][2].append(line)
    for number, (is_markdown, tags, lines) in enumerate(cells):
        while lines and not lines[-1].strip():
            lines.pop()
        if is_markdown:
            body = "\n".join(re.sub(r"^# ?", "", line) for line in lines)
            cell = nbformat.v4.new_markdown_cell(body)
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines))
        cell["id"] = f"cell-{number:02d}"  # stable ids keep regenerated files identical
        if tags:
            cell.metadata["tags"] = tags
        notebook.cells.append(cell)
    notebook.cells.insert(1, colab_setup_cell())  # right after the title
    return notebook


def render(name: str) -> str:
    """The ``.ipynb`` text generated from ``tools/nbsrc/<name>.py``."""
    notebook = parse((SOURCES / f"{name}.py").read_text())
    return nbformat.writes(notebook, version=4) + "\n"


def main(names: list[str]) -> None:
    names = names or sorted(path.stem for path in SOURCES.glob("*.py"))
    for name in names:
        target = ROOT / "notebooks" / f"{name}.ipynb"
        target.write_text(render(name))
        print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
