"""Tests of neonb.splits on a manifest table built in memory (no images needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neonb.errors import ConfigError, DataError
from neonb.splits import (
    pipeline_splits,
    read_splits,
    select,
    stratified_pick,
    transfer_splits,
    write_splits,
)


def _manifest(n_participants: int = 300, n_rescanned: int = 20, seed: int = 1) -> pd.DataFrame:
    """Manifest-like table; the first ``n_rescanned`` preterm infants also have a term scan."""
    rng = np.random.default_rng(seed)
    ages = np.clip(44 - rng.gamma(2.0, 2.0, n_participants), 26.7, 45.1)
    rows = [
        {"participant_id": f"P{i:04d}", "session_id": "1", "scan_age": age, "complete": True}
        for i, age in enumerate(ages)
    ]
    young = np.argsort(ages)[:n_rescanned]
    rows += [
        {"participant_id": f"P{i:04d}", "session_id": "2", "scan_age": 41.0, "complete": True}
        for i in young
    ]
    rows.append({"participant_id": "PBAD", "session_id": "1", "scan_age": 40.0, "complete": False})
    return pd.DataFrame(rows)


def test_stratified_pick_follows_the_age_distribution():
    ages = pd.Series(np.linspace(26, 46, 1000), index=[f"p{i}" for i in range(1000)])
    picked = stratified_pick(ages, 100, np.random.default_rng(0))
    assert len(set(picked)) == 100
    # one draw per decile-sized stratum: the picked ages span the range evenly
    picked_ages = np.sort(ages[picked].to_numpy())
    assert np.all(np.abs(picked_ages - np.linspace(26.1, 45.9, 100)) < 0.25)


def test_pipeline_splits_sizes_disjoint_and_grouped():
    manifest = _manifest()
    splits = pipeline_splits(manifest, subset_fraction=0.2, val_fraction=0.2, n_test=100, seed=3)
    per_split = splits.groupby("split")["participant_id"].nunique()
    assert per_split["train"] + per_split["val"] == 60  # 20 % of 300 participants
    assert per_split["val"] == 12
    assert per_split["test"] == 100
    # a participant is in one split only, and incomplete sessions are never used
    assert (splits.groupby("participant_id")["split"].nunique() == 1).all()
    assert "PBAD" not in set(splits["participant_id"])
    assert not splits.duplicated(["participant_id", "session_id"]).any()


def test_pipeline_splits_are_age_balanced():
    manifest = _manifest()
    splits = pipeline_splits(manifest, n_test=100, seed=0)
    cohort_median = manifest["scan_age"].median()
    for name in ("train", "test"):
        assert abs(splits.loc[splits["split"] == name, "scan_age"].median() - cohort_median) < 1.0


def test_splits_are_seeded():
    manifest = _manifest()
    first = pipeline_splits(manifest, seed=5)
    assert first.equals(pipeline_splits(manifest, seed=5))
    assert not first.equals(pipeline_splits(manifest, seed=6))


def test_transfer_splits_source_oldest_target_youngest():
    manifest = _manifest()
    splits = transfer_splits(
        manifest, n_source=100, n_source_val=10, n_target=120, n_target_train=40, seed=0
    )
    groups = splits.groupby("split")["participant_id"].nunique()
    assert groups.to_dict() == {
        "source_train": 90,
        "source_val": 10,
        "target_test": 80,
        "target_train": 40,
    }
    source = splits[splits["split"].str.startswith("source")]
    target = splits[splits["split"].str.startswith("target")]
    assert target["scan_age"].max() < source["scan_age"].min()
    assert not set(source["participant_id"]) & set(target["participant_id"])
    # the term-equivalent rescans (41 w) of the youngest infants are left out of the target
    assert (target["session_id"] == "1").all()


def test_write_read_select_round_trip(tmp_path):
    manifest = _manifest(60, 0)
    splits = pipeline_splits(manifest, n_test=10, seed=0)
    path = write_splits(splits, tmp_path / "out" / "splits.tsv")
    back = read_splits(path)
    pd.testing.assert_frame_equal(back, splits, check_dtype=False)
    train = select(manifest, back, "train")
    assert set(train["participant_id"]) == set(
        splits.loc[splits["split"] == "train", "participant_id"]
    )
    assert train["complete"].all()


@pytest.mark.parametrize(
    "kwargs",
    [{"subset_fraction": 0.0}, {"subset_fraction": 1.5}, {"val_fraction": 1.0}, {"n_test": -1}],
)
def test_pipeline_splits_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        pipeline_splits(_manifest(50, 0), **kwargs)


def test_transfer_splits_rejects_too_few_participants():
    with pytest.raises(ConfigError, match="only 50"):
        transfer_splits(_manifest(50, 0), n_source=40, n_target=20, n_target_train=5)


def test_select_unknown_split_names_the_splits_present():
    manifest = _manifest(50, 0)
    with pytest.raises(ConfigError, match="train"):
        select(manifest, pipeline_splits(manifest, n_test=5), "source_train")


def test_read_splits_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such splits file"):
        read_splits(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("participant_id\tsplit\nP1\ttrain\n")
    with pytest.raises(DataError, match="bad.tsv: missing column"):
        read_splits(bad)
