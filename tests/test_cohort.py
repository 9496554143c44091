"""Tests of neonb.cohort: cohort facts beside the paper's, age ranges and tissue volumes."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neonb import paper
from neonb.cohort import (
    COHORT_FACTS,
    age_ranges,
    cohort_facts,
    compare_with_paper,
    tissue_volumes,
)
from neonb.errors import ConfigError, DataError


def _manifest(**changes) -> pd.DataFrame:
    """Five sessions of four infants (one rescanned), one incomplete, one unknown birth."""
    table = pd.DataFrame(
        {
            "participant_id": ["a", "a", "b", "c", "d"],
            "session_id": ["1", "2", "1", "1", "1"],
            "scan_age": [30.0, 40.5, 41.0, 36.0, 44.0],
            "preterm": pd.array([True, True, False, None, False], dtype="boolean"),
            "complete": [True, True, True, True, False],
            "dseg": "",
        }
    )
    return table.assign(**changes)


def test_cohort_facts_count_complete_sessions_infants_rescans_and_births():
    facts = cohort_facts(_manifest())
    assert (facts["sessions"], facts["participants"], facts["rescanned infants"]) == (4, 3, 1)
    assert (facts["youngest (w)"], facts["oldest (w)"]) == (30.0, 41.0)  # d is incomplete
    assert facts["median (w)"] == pytest.approx(38.25)
    assert facts["mean (w)"] == pytest.approx((30.0 + 40.5 + 41.0 + 36.0) / 4)
    assert (facts["preterm-born"], facts["term-born"], facts["birth age unknown"]) == (2, 1, 1)
    assert facts["preterm-born (%)"] == pytest.approx(50.0)  # of all complete sessions
    empty = cohort_facts(_manifest(complete=False))
    assert empty["sessions"] == 0 and math.isnan(empty["youngest (w)"])
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['preterm'\]"):
        cohort_facts(_manifest().drop(columns="preterm"))


def test_compare_with_paper_puts_the_papers_facts_beside_and_leaves_the_unstated_blank():
    table = compare_with_paper(_manifest(), label="tiny")
    assert list(table.index) == list(COHORT_FACTS)
    assert list(table.columns) == ["paper (dHCP, n=709)", "tiny"]
    ours, theirs = table["tiny"], table["paper (dHCP, n=709)"]
    assert ours["rescanned infants"] == 1 and ours["sessions"] == 4
    assert theirs["sessions"] == 709 and theirs["youngest (w)"] == 26.71
    assert theirs["preterm-born"] == 148
    assert theirs["preterm-born (%)"] == pytest.approx(100 * 148 / 709)
    assert theirs[["participants", "rescanned infants", "term-born"]].isna().all()
    assert set(paper.COHORT) <= set(COHORT_FACTS)  # every fact the paper states is shown


def test_age_ranges_by_birth():
    table = age_ranges(_manifest())
    assert list(table.index) == ["preterm-born", "term-born", "birth age unknown"]
    assert table.loc["preterm-born"].to_dict() == {
        "sessions": 2,
        "participants": 1,
        "youngest (w)": 30.0,
        "median (w)": 35.25,
        "oldest (w)": 40.5,
    }
    assert table.loc["term-born", "oldest (w)"] == 41.0  # d (44 weeks) is incomplete
    known = age_ranges(_manifest(preterm=pd.array([True] * 5, dtype="boolean")))
    assert list(known.index) == ["preterm-born"]


def _label_image(path, counts: dict[int, int], spacing) -> str:
    """A label image holding ``counts[value]`` voxels of each value (the rest background)."""
    values = np.zeros(64, dtype=np.uint8)
    start = 0
    for value, n in counts.items():
        values[start : start + n] = value
        start += n
    nib.save(nib.Nifti1Image(values.reshape(4, 4, 4), np.diag([*spacing, 1.0])), path)
    return str(path)


def test_tissue_volumes_count_voxels_times_voxel_volume(tmp_path):
    first = _label_image(tmp_path / "a1.nii.gz", {1: 8, 3: 4}, (2.0, 2.0, 2.0))  # 8 mm³
    second = _label_image(tmp_path / "a2.nii.gz", {3: 10, 9: 1}, (1.0, 1.0, 0.5))
    manifest = _manifest(
        complete=[True, True, False, False, False], dseg=[first, second, "", "", ""]
    )
    table = tissue_volumes(manifest, labels=(1, 3, 9))
    assert list(table.columns) == [
        "participant_id",
        "session_id",
        "scan_age",
        "preterm",
        "tissue",
        "volume_ml",
    ]
    assert table["tissue"].tolist() == ["CSF", "WM", "Hippoc."] * 2
    expected = [8 * 8 / 1000, 4 * 8 / 1000, 0.0, 0.0, 10 * 0.5 / 1000, 0.5 / 1000]
    assert table["volume_ml"].tolist() == pytest.approx(expected)
    assert table["session_id"].tolist() == ["1"] * 3 + ["2"] * 3
    assert len(tissue_volumes(manifest)) == 2 * 8  # every tissue by default
    broken = manifest.assign(dseg=[first, str(tmp_path / "missing.nii.gz"), "", "", ""])
    with pytest.raises(DataError, match="missing.nii.gz"):
        tissue_volumes(broken)
