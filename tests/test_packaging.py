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
    study = pyproject["project"]["optional-dependencies"]["study"]
    pip_deps = dict(_split(r) for r in [*pyproject["project"]["dependencies"], *study])
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


STUDY_STACK = ("papermill", "jupyter_book", "jupyterlab", "ipykernel", "nbclient", "nbformat")
"""What ``neonb[study]`` adds; ``neonb segment`` must run without any of it."""


def test_the_study_stack_is_an_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = {_split(r)[0] for r in pyproject["project"]["dependencies"]}
    study = {_split(r)[0] for r in pyproject["project"]["optional-dependencies"]["study"]}
    assert {"papermill", "jupyter-book", "jupyterlab", "ipykernel"} <= study
    assert not core & study
    assert {"torch", "monai", "nibabel", "safetensors"} <= core


def test_neonb_segment_imports_nothing_from_the_study_stack(tmp_path):
    """Segment a scan in a fresh interpreter, then list the study packages it imported."""
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
import nibabel as nib, numpy as np
from test_wild_inputs import _head, _write_model
from neonb.cli import main
model = _write_model(Path({str(tmp_path)!r}) / "model")
for name in ("t1w", "t2w"):
    nib.save(nib.Nifti1Image(_head(), np.eye(4)), Path({str(tmp_path)!r}) / f"{{name}}.nii.gz")
status = main(["segment", "--model", str(model), "--t1", {str(tmp_path / "t1w.nii.gz")!r},
               "--t2", {str(tmp_path / "t2w.nii.gz")!r}, "--out", {str(tmp_path / "out")!r}])
loaded = sorted(m for m in {STUDY_STACK!r} if m in sys.modules)
print("STATUS", status, "LOADED", ",".join(loaded))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert "STATUS 0 LOADED \n" in done.stdout + "\n", done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "out").is_dir()
