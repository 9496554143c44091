"""The two ways to install neonb (pip, conda) ask for the same packages."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names some packages differently from PyPI
CONDA_TO_PYPI = {"pytorch": "torch"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
    return name.lower(), spec.replace(" ", "")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pip_deps = dict(_split(r) for r in pyproject["project"]["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_deps = {}
    for entry in env["dependencies"]:
        if isinstance(entry, str):
            name, spec = _split(entry)
            if name not in {"python", "pip"}:
                conda_deps[CONDA_TO_PYPI.get(name, name)] = spec
    assert conda_deps == pip_deps


def test_console_script_is_registered():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["neonb"] == "neonb.cli:main"
