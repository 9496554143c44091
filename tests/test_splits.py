"""Tests of neonb.splits on a manifest table built in memory (no images needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neonb.errors import ConfigError, DataError
from neonb.splits import (
    EXCLUDED,
    POOL,
    SPLITS_SETTINGS,
    SplitSizes,
    ensure_study_splits,
    left_out,
    load_study_splits,
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


def test_pipeline_splits_count_sessions_exactly_one_per_participant():
    manifest = _manifest()  # 300 participants, 20 of them scanned twice
    splits = pipeline_splits(manifest, n_train=60, n_val=12, n_test=100, seed=3)
    counts = splits["split"].value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (60, 12, 100)
    # every complete session is on record, the 20 second sessions as left out
    assert counts[EXCLUDED] == 20 and counts[POOL] == 300 - 172
    assert len(splits) == 320 and "PBAD" not in set(splits["participant_id"])
    used = splits[~splits["split"].isin([EXCLUDED, POOL])]
    assert not used["participant_id"].duplicated().any()
    # an excluded session's participant is in the experiment with its other session
    excluded = splits[splits["split"] == EXCLUDED]
    assert set(excluded["participant_id"]) <= set(
        splits.loc[splits["split"] != EXCLUDED, "participant_id"]
    )
    assert left_out(splits).loc[0, "sessions_left_out"] == 20


def test_pipeline_splits_refuse_more_sessions_than_participants():
    with pytest.raises(ConfigError, match="only 50 participants"):
        pipeline_splits(_manifest(50, 10), n_train=30, n_val=10, n_test=11)


def test_pipeline_splits_are_age_balanced():
    manifest = _manifest()
    splits = pipeline_splits(manifest, n_train=60, n_val=12, n_test=100, seed=0)
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
    counts = splits["split"].value_counts().to_dict()
    assert {k: v for k, v in counts.items() if k != EXCLUDED} == {
        "source_train": 90,
        "source_val": 10,
        "target_test": 80,
        "target_train": 40,
    }
    source = splits[splits["split"].str.startswith("source")]
    target = splits[splits["split"].str.startswith("target")]
    assert target["scan_age"].max() < source["scan_age"].min()
    assert not set(source["participant_id"]) & set(target["participant_id"])
    assert not target["participant_id"].duplicated().any()
    # the target is the 120 youngest sessions: nobody younger is outside it
    complete = manifest[manifest["complete"]]
    assert (complete["scan_age"] < target["scan_age"].max()).sum() <= 120


def test_transfer_splits_leave_out_rescans_of_target_infants_from_the_source():
    manifest = _manifest(300, 20)
    # the 20 youngest infants' rescans are the oldest sessions of all: they would be the source
    manifest.loc[manifest["session_id"] == "2", "scan_age"] = 45.0
    splits = transfer_splits(manifest, n_source=30, n_source_val=3, n_target=40, n_target_train=8)
    excluded = splits[splits["split"] == EXCLUDED]
    assert len(excluded) == 20 and (excluded["session_id"] == "2").all()
    source = splits[splits["split"].str.startswith("source")]
    assert len(source) == 30 and (source["session_id"] == "1").all()


def test_write_read_select_round_trip(tmp_path):
    manifest = _manifest(60, 0)
    splits = pipeline_splits(manifest, n_train=20, n_val=5, n_test=10, seed=0)
    path = write_splits(splits, tmp_path / "out" / "splits.tsv")
    back = read_splits(path)
    pd.testing.assert_frame_equal(back, splits, check_dtype=False)
    train = select(manifest, back, "train")
    assert set(train["participant_id"]) == set(
        splits.loc[splits["split"] == "train", "participant_id"]
    )
    assert train["complete"].all()


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"n_val": -1}, {"n_test": -1}])
def test_pipeline_splits_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        pipeline_splits(_manifest(50, 0), **{"n_train": 10, "n_val": 2, "n_test": 5, **kwargs})


def test_transfer_splits_rejects_too_few_participants():
    with pytest.raises(ConfigError, match="only 50"):
        transfer_splits(_manifest(50, 0), n_source=40, n_target=20, n_target_train=5)


def test_select_unknown_split_names_the_splits_present():
    manifest = _manifest(50, 0)
    with pytest.raises(ConfigError, match="train"):
        select(manifest, pipeline_splits(manifest, n_train=9, n_val=2, n_test=5), "source_train")


def test_read_splits_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such splits file"):
        read_splits(tmp_path / "nope.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("participant_id\tsplit\nP1\ttrain\n")
    with pytest.raises(DataError, match="bad.tsv: missing column"):
        read_splits(bad)


SMALL = SplitSizes(
    n_train=20, n_val=5, n_test=10, n_source=10, n_source_val=2, n_target=12, n_target_train=4
)


def test_study_splits_are_drawn_once_then_read_back(tmp_path):
    manifest = _manifest(120, 10)
    first = ensure_study_splits(tmp_path, manifest, SMALL)
    assert (tmp_path / SPLITS_SETTINGS).is_file()
    # a later chapter reads the files: a change to them is what it sees
    path = tmp_path / "splits_pipeline.tsv"
    edited = first["pipeline"].iloc[::-1]
    write_splits(edited, path)
    again = load_study_splits(tmp_path, manifest, SMALL)
    assert again["pipeline"]["participant_id"].tolist() == edited["participant_id"].tolist()
    assert ensure_study_splits(tmp_path, manifest, SMALL)["transfer"].equals(
        read_splits(tmp_path / "splits_transfer.tsv")
    )


def test_study_splits_refuse_other_sizes_or_other_data(tmp_path):
    manifest = _manifest(120, 10)
    ensure_study_splits(tmp_path, manifest, SMALL)
    other = SplitSizes(**{**SMALL.__dict__, "n_test": 11})
    with pytest.raises(ConfigError, match="n_test=10 \\(now 11\\)"):
        load_study_splits(tmp_path, manifest, other)
    renamed = manifest.assign(participant_id="X" + manifest["participant_id"])
    with pytest.raises(DataError, match="splits_pipeline.tsv: names .* session"):
        load_study_splits(tmp_path, renamed, SMALL)


def test_missing_study_splits_say_to_run_chapter_00(tmp_path):
    with pytest.raises(DataError, match="run chapter 00_data first"):
        load_study_splits(tmp_path)


def test_split_sizes_from_params_name_what_is_wrong():
    params = {**SMALL.__dict__, "extra": 1}
    assert SplitSizes.from_params(params) == SMALL
    with pytest.raises(ConfigError, match="n_val"):
        SplitSizes.from_params({k: v for k, v in params.items() if k != "n_val"})
    with pytest.raises(ConfigError, match="n_test must be a whole number"):
        SplitSizes.from_params({**params, "n_test": 0.5})
