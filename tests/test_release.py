"""neonb.data on a folder shaped like the dHCP third release (tests/release_fixture.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from release_fixture import (
    DERIVATIVES,
    RELEASE_COMPLETE,
    RELEASE_PARTICIPANTS,
    RELEASE_RESCANNED,
    RELEASE_SESSIONS,
    SCAN_AGE_RANGE,
    incomplete_counts,
    make_release,
)

from neonb.cli import main
from neonb.data import check_session, read_manifest, summarize_manifest, to_data_dicts


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("rel3"), layout="release")


@pytest.fixture(scope="module")
def manifest(release) -> pd.DataFrame:
    return read_manifest(release, images="plain", progress=False)


def _key(table: pd.DataFrame) -> pd.Series:
    return table["participant_id"] + "/" + table["session_id"]


def test_the_release_counts(manifest):
    summary = summarize_manifest(manifest)
    assert (summary.n_sessions, summary.n_participants) == (RELEASE_SESSIONS, RELEASE_PARTICIPANTS)
    assert summary.n_complete == RELEASE_COMPLETE
    assert summary.excluded == incomplete_counts(RELEASE_SESSIONS - RELEASE_COMPLETE)
    per_participant = manifest.groupby("participant_id").size()
    assert int((per_participant > 1).sum()) == RELEASE_RESCANNED
    n_third_scans = RELEASE_SESSIONS - RELEASE_PARTICIPANTS - RELEASE_RESCANNED
    assert int((per_participant > 2).sum()) == n_third_scans == 2
    assert summary.n_brain_mask == RELEASE_COMPLETE


def test_scan_ages_are_spread_like_the_release(manifest):
    ages = manifest["scan_age"].dropna()
    assert (ages.min(), ages.max()) == SCAN_AGE_RANGE
    complete = manifest.loc[manifest.complete, "scan_age"]
    assert 40.2 <= complete.median() <= 41.0  # the paper's median is about 40.6
    assert complete.mean() < complete.median()  # skewed towards the preterm ages
    assert 0.15 <= manifest.loc[manifest.complete, "preterm"].mean() <= 0.3


def test_rescanned_infants_are_preterm_then_term_equivalent(manifest):
    for _, sessions in manifest.groupby("participant_id"):
        if len(sessions) < 2:
            continue
        ages = sessions["scan_age"].to_numpy()
        known = ages[~np.isnan(ages)]
        assert bool(sessions["preterm"].iloc[0])
        assert np.all(np.diff(known) > 0)  # sessions sort in the order they were scanned
        if not np.isnan(ages[0]):
            assert ages[0] < 37.0
        if not np.isnan(ages[1]):
            assert ages[1] >= 38.0


def test_release_and_derivatives_roots_read_the_same(release, manifest):
    assert (release / DERIVATIVES).is_dir() and not list(release.glob("sub-*/ses-*"))
    inner = read_manifest(release / DERIVATIVES, images="plain", progress=False)
    pd.testing.assert_frame_equal(inner, manifest)


def test_the_derivatives_layout_reads_the_same(tmp_path, manifest):
    root = make_release(tmp_path, layout="derivatives")
    flat = read_manifest(root, images="plain", progress=False)
    columns = ["participant_id", "session_id", "scan_age", "birth_age", "complete"]
    pd.testing.assert_frame_equal(flat[columns], manifest[columns])
    assert flat.t2w.iloc[0].startswith(str(root / "sub-"))


def test_both_image_kinds_give_the_same_sessions_as_pairs_of_their_own(release, manifest):
    restore = read_manifest(release, progress=False)
    assert restore.complete.tolist() == manifest.complete.tolist()
    complete = manifest.complete
    assert manifest.loc[complete, "t1w"].str.endswith("_T1w.nii.gz").all()
    assert manifest.loc[complete, "t2w"].str.endswith("_T2w.nii.gz").all()
    assert not manifest.loc[complete, "t1w"].str.contains("desc-restore").any()
    assert restore.loc[complete, "t1w"].str.endswith("_desc-restore_T1w.nii.gz").all()
    assert restore.loc[complete, "t2w"].str.endswith("_desc-restore_T2w.nii.gz").all()
    assert (_key(restore) == _key(manifest)).all()


def test_brain_masks_applied_and_checked(release):
    applied = read_manifest(release, brain_mask="apply", progress=False)
    assert int(applied.complete.sum()) == RELEASE_COMPLETE
    records = to_data_dicts(applied, brain_mask="apply")
    assert len(records) == RELEASE_COMPLETE
    assert all(r["brain_mask"].endswith("_desc-brain_mask.nii.gz") for r in records)
    # the tiny images are valid: --check finds nothing wrong in a sample of sessions
    sample = applied[applied.complete].head(20)
    for row in sample.itertuples():
        paths = {key: getattr(row, key) for key in ("t1w", "t2w", "dseg", "brain_mask")}
        assert check_session(paths) == [], row.session_id


def test_manifest_command_on_the_release(release, tmp_path, capsys):
    out = tmp_path / "manifest.tsv"
    args = ["manifest", str(release), "--images", "plain", "--brain-mask", "apply"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"found {RELEASE_SESSIONS} sessions of {RELEASE_PARTICIPANTS}")
    assert f"complete: {RELEASE_COMPLETE} sessions" in text
    written = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert written["t1w"][written["complete"] == "True"].str.endswith("_T1w.nii.gz").all()


def test_make_release_refuses_counts_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="cannot make"):
        make_release(tmp_path, n_participants=10, n_sessions=30, n_rescanned=5)
    with pytest.raises(ValueError, match="layout"):
        make_release(tmp_path, layout="flat")


def test_a_smaller_release(tmp_path):
    root = make_release(
        tmp_path, n_participants=30, n_sessions=36, n_rescanned=5, n_incomplete=6, seed=3
    )
    manifest = read_manifest(root, check=True, progress=False)
    assert (len(manifest), manifest.participant_id.nunique()) == (36, 30)
    assert int(manifest.complete.sum()) == 30
    assert summarize_manifest(manifest).excluded == incomplete_counts(6)
