"""Seeded, age-aware splits of a session manifest, drawn once and saved as TSV.

Two designs from Richter & Fetit (2022), both counted in sessions, the paper's "data units":

* :func:`pipeline_splits` (§4.1.1): an age-representative subset (paper: 142 of the 709
  complete dHCP sessions) divided into training and validation (114/28), plus an
  independent, also age-representative test set (100) drawn from the rest.
* :func:`transfer_splits` (§3.5): a *source* of the oldest sessions (100; the 10 of them held
  out for validation are neonb's choice) and a *target* of the youngest (120: 40 train,
  80 test).

Age-representative sampling is stratified by age: the candidates are sorted by scan
age, cut into as many equal-count strata as there are sessions to draw, and one is
drawn at random from each stratum, so the sample's age histogram follows the cohort's.

**One session per participant and experiment.** About one dHCP infant in eight was
scanned more than once (a preterm-born infant soon after birth and again at
term-equivalent age, say). Two scans of one brain in two sets of one experiment would leak
anatomy from training into evaluation, and keeping both in one set would make the set
sizes depend on who was rescanned. So within an experiment a participant contributes one
session: for the pipeline (and the chapters built on its splits, AgeU-Net and label
budgeting) one drawn at random, for transfer learning the youngest session for the target
and the oldest for the source. Every session an experiment leaves out for this reason is
kept in its table with the split :data:`EXCLUDED`, so the number left out, and their ages,
are on record.

The study draws its splits once (:func:`ensure_study_splits`, called by the plan and by
chapter 00) and writes them, with the sizes and seed they were drawn with, next to the
results; every later chapter reads them back (:func:`load_study_splits`), as nnU-Net
reads its ``splits_final.json``.

Example:
    >>> sizes = SplitSizes(n_train=114, n_val=28, n_test=100, n_source=100,
    ...                    n_source_val=10, n_target=120, n_target_train=40, seed=0)
    >>> tables = ensure_study_splits("results/paper", manifest, sizes)  # doctest: +SKIP
    >>> tables["pipeline"]["split"].value_counts()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write, read_id_table, write_id_table

SPLIT_COLUMNS = ["participant_id", "session_id", "scan_age", "split"]
"""Columns of a splits TSV."""

EXCLUDED = "excluded"
"""Split of a session left out of an experiment: its participant is in it with another session."""

POOL = "pool"
"""Split of a pipeline session drawn into no set; label budgeting spends annotations on these."""

PIPELINE_SETS = ("train", "val", "test")
TRANSFER_SETS = ("source_train", "source_val", "target_train", "target_test")

STUDY_SPLITS = {"pipeline": "splits_pipeline.tsv", "transfer": "splits_transfer.tsv"}
"""The study's split tables, by experiment, as files in the results folder."""

SPLITS_SETTINGS = "splits.json"
"""The sizes and seed the study's splits were drawn with, beside the tables."""


def complete_sessions(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's complete sessions with a scan age, ids as text, youngest first."""
    missing = {"participant_id", "session_id", "scan_age", "complete"} - set(manifest.columns)
    if missing:
        raise ConfigError(f"the manifest lacks the column(s) {sorted(missing)}")
    usable = manifest[manifest["complete"].astype(bool) & manifest["scan_age"].notna()].copy()
    usable["participant_id"] = usable["participant_id"].astype(str)
    usable["session_id"] = usable["session_id"].astype(str)
    usable["scan_age"] = usable["scan_age"].astype(float)
    return usable.sort_values(["scan_age", "participant_id", "session_id"], kind="stable")


def stratified_pick(ages: pd.Series, n: int, rng: np.random.Generator) -> list[str]:
    """Draw ``n`` entries of ``ages`` so that their distribution follows the whole series.

    Args:
        ages: scan age in weeks, indexed by a unique id (a participant id).
        n: how many to draw, ``0 <= n <= len(ages)``.
        rng: random generator; the draw depends on nothing else.

    Returns:
        The drawn index labels, youngest stratum first.

    Raises:
        ConfigError: if ``n`` is negative or larger than the number of candidates.
    """
    if not 0 <= n <= len(ages):
        raise ConfigError(f"cannot draw {n} sessions from {len(ages)} candidates")
    if n == 0:
        return []
    ordered = ages.sort_values(kind="stable").index.to_numpy()
    return [str(rng.choice(stratum)) for stratum in np.array_split(ordered, n)]


def _table(sessions: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    """``sessions`` with their ``split``, in SPLIT_COLUMNS order, sorted by split and age."""
    rows = sessions.assign(split=split.to_numpy())
    return (
        rows[SPLIT_COLUMNS]
        .sort_values(["split", "scan_age", "participant_id", "session_id"], kind="stable")
        .reset_index(drop=True)
    )


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")


def pipeline_splits(
    manifest: pd.DataFrame,
    *,
    n_train: int = 114,
    n_val: int = 28,
    n_test: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """Training, validation and test sessions for the segmentation pipeline (paper §4.1.1).

    Each participant enters with one session drawn at random; an age-representative subset
    of ``n_train + n_val`` of these is divided, again by age, into training and validation,
    and the test set is drawn age-representatively from the rest.

    Args:
        manifest: a session manifest (:func:`neonb.data.read_manifest`); only complete
            sessions with a scan age are used.
        n_train: training sessions (paper: 114).
        n_val: validation sessions (paper: 28).
        n_test: test sessions (paper: 100).
        seed: fixes every draw.

    Returns:
        One row per complete session: ``participant_id, session_id, scan_age, split`` with
        split ``"train"``, ``"val"``, ``"test"``, :data:`POOL` (in no set) or
        :data:`EXCLUDED` (the participant entered with another session).

    Raises:
        ConfigError: if a size is negative, or the sets need more participants than the
            manifest has complete sessions of.
    """
    _check_counts(n_train=n_train, n_val=n_val, n_test=n_test)
    if n_train < 1:
        raise ConfigError(f"n_train must be >= 1, got {n_train}")
    rng = np.random.default_rng(seed)
    sessions = complete_sessions(manifest)
    order = rng.permutation(len(sessions))
    chosen = ~sessions.iloc[order]["participant_id"].duplicated().to_numpy()
    units = sessions.iloc[np.sort(order[chosen])]
    needed = n_train + n_val + n_test
    if needed > len(units):
        raise ConfigError(
            f"the pipeline's splits need {needed} sessions of different participants "
            f"({n_train} train + {n_val} validation + {n_test} test), but the manifest has "
            f"complete sessions of only {len(units)} participants"
        )
    ages = pd.Series(units["scan_age"].to_numpy(), index=units["participant_id"].to_numpy())
    subset = stratified_pick(ages, n_train + n_val, rng)
    val = set(stratified_pick(ages[subset], n_val, rng))
    test = set(stratified_pick(ages.drop(subset), n_test, rng))
    assignment = {pid: ("val" if pid in val else "train") for pid in subset}
    assignment |= dict.fromkeys(test, "test")
    unit_keys = set(zip(units["participant_id"], units["session_id"], strict=True))
    split = [
        assignment.get(pid, POOL) if (pid, sid) in unit_keys else EXCLUDED
        for pid, sid in zip(sessions["participant_id"], sessions["session_id"], strict=True)
    ]
    return _table(sessions, pd.Series(split))


def _first_per_participant(
    sessions: pd.DataFrame, n: int, barred: set[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first ``n`` sessions of distinct participants outside ``barred``, in table order.

    Returns:
        ``(taken, skipped)``: the sessions taken, and those passed over on the way because
        their participant was barred or already taken.
    """
    taken_ids: set[str] = set()
    taken, skipped = [], []
    for index, pid in zip(sessions.index, sessions["participant_id"], strict=True):
        if len(taken) == n:
            break
        if pid in barred or pid in taken_ids:
            skipped.append(index)
        else:
            taken_ids.add(pid)
            taken.append(index)
    return sessions.loc[taken], sessions.loc[skipped]


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

    The target is the ``n_target`` youngest sessions of different participants; the source
    the ``n_source`` oldest sessions of different participants outside the target. A
    preterm-born infant's term-equivalent rescan therefore never enters the source when its
    first scan is in the target. Each set is then split age-representatively.

    Args:
        manifest: a session manifest; only complete sessions with a scan age are used.
        n_source: oldest sessions, pre-trained on (paper: 100).
        n_source_val: of which held out for validation (neonb's choice: 10; the paper
            names no source validation set).
        n_target: youngest sessions (paper: 120).
        n_target_train: of which used for fine-tuning (paper: 40); the rest are test.
        seed: fixes every draw.

    Returns:
        One row per session of the two sets, split ``"source_train"``, ``"source_val"``,
        ``"target_train"`` or ``"target_test"``, plus one :data:`EXCLUDED` row for every
        session passed over while filling a set because its participant was already in the
        experiment.

    Raises:
        ConfigError: if the sizes are inconsistent or the manifest is too small.
    """
    if not 0 < n_source_val < n_source:
        raise ConfigError(f"need 0 < n_source_val < n_source, got {n_source_val}, {n_source}")
    if not 0 < n_target_train < n_target:
        raise ConfigError(f"need 0 < n_target_train < n_target, got {n_target_train}, {n_target}")
    sessions = complete_sessions(manifest)
    target, skipped_target = _first_per_participant(sessions, n_target, set())
    source, skipped_source = _first_per_participant(
        sessions.iloc[::-1], n_source, set(target["participant_id"])
    )
    if len(target) < n_target or len(source) < n_source:
        raise ConfigError(
            f"{n_source} source + {n_target} target sessions of different participants "
            f"requested, but the manifest has complete sessions of only "
            f"{sessions['participant_id'].nunique()} participants"
        )
    rng = np.random.default_rng(seed)
    source_ages = pd.Series(source["scan_age"].to_numpy(), index=source["participant_id"])
    target_ages = pd.Series(target["scan_age"].to_numpy(), index=target["participant_id"])
    source_val = set(stratified_pick(source_ages, n_source_val, rng))
    target_train = set(stratified_pick(target_ages, n_target_train, rng))
    parts = [
        (
            source,
            source["participant_id"].map(
                lambda p: "source_val" if p in source_val else "source_train"
            ),
        ),
        (
            target,
            target["participant_id"].map(
                lambda p: "target_train" if p in target_train else "target_test"
            ),
        ),
        (skipped_target, pd.Series(EXCLUDED, index=skipped_target.index)),
        (skipped_source, pd.Series(EXCLUDED, index=skipped_source.index)),
    ]
    sessions = pd.concat([rows for rows, _ in parts])
    split = pd.concat([labels for _, labels in parts])
    return _table(sessions, split)


def left_out(table: pd.DataFrame) -> pd.DataFrame:
    """How many sessions an experiment leaves out (:data:`EXCLUDED`), with their ages.

    Returns:
        One row: ``sessions_left_out``, ``participants``, ``youngest``, ``oldest`` (weeks).
    """
    excluded = table[table["split"] == EXCLUDED]
    return pd.DataFrame(
        {
            "sessions_left_out": [len(excluded)],
            "participants": [excluded["participant_id"].nunique()],
            "youngest": [excluded["scan_age"].min() if len(excluded) else np.nan],
            "oldest": [excluded["scan_age"].max() if len(excluded) else np.nan],
        }
    )


@dataclass(frozen=True)
class SplitSizes:
    """Sizes of the study's sets, in sessions, and the seed they are drawn with.

    The defaults are the paper's (§4.1.1, §4.3). :meth:`from_params` reads them from a
    chapter's parameters (``study.yaml``).
    """

    n_train: int = 114
    n_val: int = 28
    n_test: int = 100
    n_source: int = 100
    n_source_val: int = 10
    n_target: int = 120
    n_target_train: int = 40
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SplitSizes:
        """The sizes named in ``params`` (other keys are ignored; missing ones are an error)."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in params]
        if missing:
            raise ConfigError(f"the study parameters lack the split size(s) {missing}")
        values = {}
        for name in names:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
            values[name] = value
        return cls(**values)


def draw_study_splits(manifest: pd.DataFrame, sizes: SplitSizes) -> dict[str, pd.DataFrame]:
    """The pipeline and transfer splits of :data:`STUDY_SPLITS`, drawn from ``sizes``."""
    return {
        "pipeline": pipeline_splits(
            manifest,
            n_train=sizes.n_train,
            n_val=sizes.n_val,
            n_test=sizes.n_test,
            seed=sizes.seed,
        ),
        "transfer": transfer_splits(
            manifest,
            n_source=sizes.n_source,
            n_source_val=sizes.n_source_val,
            n_target=sizes.n_target,
            n_target_train=sizes.n_target_train,
            seed=sizes.seed,
        ),
    }


def save_study_splits(
    tables: Mapping[str, pd.DataFrame], folder: str | os.PathLike, sizes: SplitSizes
) -> list[Path]:
    """Write the study's split tables and :data:`SPLITS_SETTINGS` to ``folder``, atomically."""
    folder = Path(folder)
    written = [write_splits(tables[name], folder / file) for name, file in STUDY_SPLITS.items()]
    settings = json.dumps(asdict(sizes), indent=2) + "\n"
    written.append(atomic_write(folder / SPLITS_SETTINGS, lambda tmp: tmp.write_text(settings)))
    return written


def load_study_splits(
    folder: str | os.PathLike,
    manifest: pd.DataFrame | None = None,
    sizes: SplitSizes | None = None,
) -> dict[str, pd.DataFrame]:
    """Read the study's split tables that :func:`save_study_splits` wrote.

    Args:
        folder: the results folder of the parameters (``results_dir``).
        manifest: if given, every session of a set must be a complete session in it.
        sizes: if given, the splits must have been drawn with these sizes and seed.

    Raises:
        DataError: naming the file, if a table is missing (run chapter 00 first) or names
            a session the manifest does not have complete.
        ConfigError: naming the file, if the splits were drawn with other sizes.
    """
    folder = Path(folder)
    settings_path = folder / SPLITS_SETTINGS
    hint = "run chapter 00_data first (neonb study), which draws the splits and writes them"
    if not settings_path.is_file():
        raise DataError(settings_path, "no splits have been drawn here", hint=hint)
    if sizes is not None:
        stored = _read_settings(settings_path)
        wanted = asdict(sizes)
        changed = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if changed:
            described = ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{settings_path}: the study's splits were drawn with {described}; delete "
                f"{folder}'s splits files (and the runs trained on them) to draw them anew"
            )
    tables = {name: read_splits(folder / file) for name, file in STUDY_SPLITS.items()}
    if manifest is not None:
        for name, table in tables.items():
            _check_against(table, manifest, folder / STUDY_SPLITS[name])
    return tables


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(path, f"cannot be read: {err}") from err
    if not isinstance(values, dict):
        raise DataError(path, "must hold a JSON object of split sizes")
    return values


def _check_against(table: pd.DataFrame, manifest: pd.DataFrame, path: Path) -> None:
    """Raise unless every session of a set in ``table`` is complete in ``manifest``."""
    used = table[~table["split"].isin([EXCLUDED, POOL])]
    complete = complete_sessions(manifest)
    known = set(zip(complete["participant_id"], complete["session_id"], strict=True))
    unknown = [
        f"sub-{p}_ses-{s}"
        for p, s in zip(used["participant_id"], used["session_id"], strict=True)
        if (p, s) not in known
    ]
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise DataError(
            path,
            f"names {len(unknown)} session(s) that the data has not complete ({shown})",
            hint="the splits were drawn from other data; delete them to draw them anew",
        )


def ensure_study_splits(
    folder: str | os.PathLike, manifest: pd.DataFrame, sizes: SplitSizes
) -> dict[str, pd.DataFrame]:
    """The study's splits: read back if drawn before (and still valid), else drawn and written.

    This is the one place the study draws its splits; see :func:`load_study_splits` for the
    checks made on splits read back.
    """
    if (Path(folder) / SPLITS_SETTINGS).is_file():
        return load_study_splits(folder, manifest, sizes)
    tables = draw_study_splits(manifest, sizes)
    save_study_splits(tables, folder, sizes)
    return tables


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
