"""The ``neonb`` command line and the study runner, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from neonb.cli import main
from neonb.errors import ConfigError
from neonb.study import (
    NotebookError,
    load_params,
    open_cohort,
    resolve_data_root,
    run_notebook,
    run_study,
)

ROOT = Path(__file__).resolve().parents[1]


def test_phantom_then_manifest(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "cohort"), "--n", "3", "--voxel-size", "8"]) == 0
    assert (
        main(["manifest", str(tmp_path / "cohort"), "--out", str(tmp_path / "m.tsv"), "--check"])
        == 0
    )
    out = capsys.readouterr().out
    assert "found 3 sessions" in out
    manifest = pd.read_csv(tmp_path / "m.tsv", sep="\t")
    assert manifest["complete"].all() and len(manifest) == 3


def test_errors_are_one_line_with_exit_status_1(tmp_path, capsys):
    assert main(["manifest", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neonb manifest: error: ") and "nowhere" in err
    assert "\n" not in err
    assert main(["phantom", str(tmp_path / "c"), "--n", "0"]) == 1
    assert "neonb phantom: error:" in capsys.readouterr().err


def test_load_params_merges_study_and_notebook_files(tmp_path):
    (tmp_path / "study.yaml").write_text("seed: 1\nn_subjects: 5\n")
    (tmp_path / "00_data.yaml").write_text("n_subjects: 7\n")
    assert load_params(tmp_path, "00_data") == {"seed": 1, "n_subjects": 7}
    assert load_params(tmp_path, "01_pipeline") is None


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    with pytest.raises(NotebookError, match=r"00_data.ipynb failed in cell \d+ .*no such folder"):
        run_notebook(
            "00_data", {"data_root": "/no/such/release"}, output_dir=tmp_path, cwd=tmp_path
        )


def test_a_study_that_cannot_be_planned_stops_before_any_notebook(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "00_data.yaml").write_text("data_root: /no/such/release\n")
    with pytest.raises(ConfigError, match=r"^00_data: /no/such/release: no such folder"):
        run_study(
            params,
            book=False,
            book_dir=tmp_path / "book",
            workdir=tmp_path,
            echo=lambda *a, **k: None,
        )
    assert not (tmp_path / "book" / "notebooks").exists()


def test_paper_scale_without_a_data_root_is_refused_before_writing(tmp_path):
    with pytest.raises(ConfigError, match=r"709 sessions at 0.5 mm.*GB.*DATA="):
        resolve_data_root("", synthetic_base=tmp_path, n=709, seed=0, voxel_size=0.5)
    assert not any(tmp_path.iterdir())


def test_open_cohort_reads_the_synthetic_cohort_it_writes(tmp_path):
    cohort = open_cohort("", synthetic_base=tmp_path, n=3, seed=2, voxel_size=8.0)
    assert cohort.root == tmp_path / "synthetic-n3-8mm-seed2"
    assert len(cohort.manifest) == 3 and cohort.manifest["complete"].all()
    assert cohort.description == "synthetic cohort, 8 mm"
    assert open_cohort(cohort.root).description == "dHCP"
