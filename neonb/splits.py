"""Seeded, age-aware splits of a session manifest, saved as TSV next to the results.

Two designs from Richter & Fetit (2022):

* :func:`pipeline_splits` (§4.1.1): an age-representative subset (20 % of the 709
  complete dHCP sessions = 142) divided into training and validation (114/28), plus an
  independent test set (100) drawn from the rest, also age-representative.
* :func:`transfer_splits` (§3.5): a *source* of the oldest sessions (100: 90 train,
  10 validation) and a *target* of the youngest (120: 40 train, 80 test).

Age-representative sampling is stratified by age: the candidates are sorted by scan
age, cut into as many equal-count strata as there are sessions to draw, and one is
drawn at random from each stratum, so the sample's age histogram follows the cohort's.
Splits are made at the level of participants: the sessions of one infant (a preterm
infant scanned after birth and again at term-equivalent age, say) never land in two
different splits, which would leak anatomy from training into evaluation. Sizes count
participants; with one session each, as for most of dHCP, that is the number of sessions.

Example:
    >>> splits = pipeline_splits(manifest, subset_fraction=0.2, n_test=100, seed=0)
    >>> write_splits(splits, "results/splits.tsv")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from neonb.errors import ConfigError
from neonb.files import read_id_table, write_id_table

SPLIT_COLUMNS = ["participant_id", "session_id", "scan_age", "split"]
"""Columns of a splits TSV."""


def _participant_ages(manifest: pd.DataFrame) -> pd.Series:
    """Youngest scan age (weeks) of each participant with a complete session."""
    _check_manifest(manifest)
    complete = manifest[manifest["complete"].astype(bool) & manifest["scan_age"].notna()]
    return complete.groupby("participant_id")["scan_age"].min().sort_values(kind="stable")


def _check_manifest(manifest: pd.DataFrame) -> None:
    missing = {"participant_id", "session_id", "scan_age", "complete"} - set(manifest.columns)
    if missing:
        raise ConfigError(f"the manifest lacks the column(s) {sorted(missing)}")


def stratified_pick(ages: pd.Series, n: int, rng: np.random.Generator) -> list[str]:
    """Draw ``n`` entries of ``ages`` so that their distribution follows the whole series.

    Args:
        ages: scan age in weeks, indexed by participant id.
        n: how many to draw, ``0 <= n <= len(ages)``.
        rng: random generator; the draw depends on nothing else.

    Returns:
        The drawn index labels, youngest stratum first.

    Raises:
        ConfigError: if ``n`` is negative or larger than the number of candidates.
    """
    if not 0 <= n <= len(ages):
        raise ConfigError(f"cannot draw {n} participants from {len(ages)} candidates")
    if n == 0:
        return []
    ordered = ages.sort_values(kind="stable").index.to_numpy()
    return [str(rng.choice(stratum)) for stratum in np.array_split(ordered, n)]


def _rows(manifest: pd.DataFrame, assignment: dict[str, str]) -> pd.DataFrame:
    """Sessions of the assigned participants, with their split, in SPLIT_COLUMNS order."""
    complete = manifest[manifest["complete"].astype(bool) & manifest["scan_age"].notna()]
    rows = complete[complete["participant_id"].isin(assignment)].copy()
    rows["split"] = rows["participant_id"].map(assignment)
    return (
        rows[SPLIT_COLUMNS]
        .sort_values(["split", "scan_age", "participant_id"])
        .reset_index(drop=True)
    )


def pipeline_splits(
    manifest: pd.DataFrame,
    *,
    subset_fraction: float = 0.2,
    val_fraction: float = 28 / 142,
    n_test: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """Training, validation and test sessions for the segmentation pipeline (paper §4.1.1).

    Args:
        manifest: a session manifest (:func:`neonb.data.read_manifest`); only complete
            sessions with a scan age are used.
        subset_fraction: fraction of participants in the age-representative
            training+validation subset (paper: 0.2, 142 of 709).
        val_fraction: fraction of that subset held out for validation (paper: 28/142).
        n_test: participants in the independent test set, drawn age-representatively
            from those outside the subset (paper: 100). Clipped to what is left.
        seed: fixes every draw.

    Returns:
        One row per session: ``participant_id, session_id, scan_age, split`` with
        split in ``{"train", "val", "test"}``.
    """
    if not 0 < subset_fraction <= 1:
        raise ConfigError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n_test < 0:
        raise ConfigError(f"n_test must be >= 0, got {n_test}")
    rng = np.random.default_rng(seed)
    ages = _participant_ages(manifest)
    n_subset = max(2, round(subset_fraction * len(ages)))
    if n_subset > len(ages):
        raise ConfigError(f"need at least 2 participants with complete sessions, got {len(ages)}")
    subset = stratified_pick(ages, n_subset, rng)
    n_val = min(max(1, round(val_fraction * n_subset)), n_subset - 1)
    val = set(stratified_pick(ages[subset], n_val, rng))
    rest = ages.drop(subset)
    test = stratified_pick(rest, min(n_test, len(rest)), rng)
    assignment = {pid: ("val" if pid in val else "train") for pid in subset}
    assignment.update(dict.fromkeys(test, "test"))
    return _rows(manifest, assignment)


def transfer_splits(
    manifest: pd.DataFrame,
    *,
    n_source: int = 100,
    n_source_val: int = 10,
    n_target: int = 120,
    n_target_train: int = 40,
    seed: int = 0,
) -> pd.DataFrame:
    """Source (oldest) and target (youngest) sets for transfer learning (paper §3.5).

    The target is the ``n_target`` youngest participants (by their youngest session),
    the source the ``n_source`` oldest of the others; each is then split
    age-representatively. A target participant keeps only its sessions no older than
    the oldest target participant's first scan, and a source participant only those no
    younger than the youngest source participant's last scan, so the term-equivalent
    rescan of a preterm infant in the target never enters the source age range.

    Args:
        manifest: a session manifest; only complete sessions with a scan age are used.
        n_source: oldest participants pre-trained on (paper: 100).
        n_source_val: of which held out for validation (paper: 10).
        n_target: youngest participants (paper: 120).
        n_target_train: of which used for fine-tuning (paper: 40); the rest are test.
        seed: fixes every draw.

    Returns:
        One row per session with split in ``{"source_train", "source_val",
        "target_train", "target_test"}``.
    """
    if not 0 < n_source_val < n_source:
        raise ConfigError(f"need 0 < n_source_val < n_source, got {n_source_val}, {n_source}")
    if not 0 < n_target_train < n_target:
        raise ConfigError(f"need 0 < n_target_train < n_target, got {n_target_train}, {n_target}")
    ages = _participant_ages(manifest)
    if n_source + n_target > len(ages):
        raise ConfigError(
            f"{n_source} source + {n_target} target participants requested but only "
            f"{len(ages)} have complete sessions"
        )
    rng = np.random.default_rng(seed)
    target_ages = ages.iloc[:n_target]
    oldest = manifest[manifest["complete"].astype(bool)].groupby("participant_id")["scan_age"].max()
    source_ages = oldest.drop(target_ages.index).sort_values(kind="stable").iloc[-n_source:]
    source_val = set(stratified_pick(source_ages, n_source_val, rng))
    target_train = set(stratified_pick(target_ages, n_target_train, rng))
    assignment = {
        pid: ("source_val" if pid in source_val else "source_train") for pid in source_ages.index
    }
    for pid in target_ages.index:
        assignment[pid] = "target_train" if pid in target_train else "target_test"
    rows = _rows(manifest, assignment)
    is_target = rows["split"].str.startswith("target")
    in_target_window = rows["scan_age"] <= target_ages.max()
    in_source_window = rows["scan_age"] >= source_ages.min()
    keep = (is_target & in_target_window) | (~is_target & in_source_window)
    return rows[keep].reset_index(drop=True)


def write_splits(splits: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a splits table (:data:`SPLIT_COLUMNS`) as TSV, atomically. Returns the path written."""
    return write_id_table(splits, SPLIT_COLUMNS, path)


def read_splits(path: str | os.PathLike) -> pd.DataFrame:
    """Read a splits TSV written by :func:`write_splits`.

    Raises:
        DataError: if the file is missing or lacks a column of :data:`SPLIT_COLUMNS`.
    """
    return read_id_table(path, SPLIT_COLUMNS, "splits")


def select(manifest: pd.DataFrame, splits: pd.DataFrame, split: str) -> pd.DataFrame:
    """Manifest rows of the sessions in ``split`` (e.g. ``"train"``), in splits order.

    Raises:
        ConfigError: if no session is in ``split``.
    """
    chosen = splits[splits["split"] == split][["participant_id", "session_id"]]
    if chosen.empty:
        raise ConfigError(
            f"no session in split {split!r}; splits present: {sorted(splits['split'].unique())}"
        )
    keys = manifest.astype({"participant_id": str, "session_id": str})
    return chosen.merge(keys, on=["participant_id", "session_id"], how="left")
