"""Label budgeting: which 2D slices to annotate, as masks the training loss respects.

Richter & Fetit (2022, §3.4, §4.2) ask how a fixed budget of annotated 2D slices is best
spent: on a few fully labelled volumes, or spread thinly over more subjects ("label
dispersion"), and along which axis (sagittal, coronal, axial, or random). They hide existing
labels: for each training subject, slices are chosen *before* any transform, a mask marks the
annotated voxels, the mask follows the image through every spatial augmentation, and the loss
counts only annotated voxels. This module makes those choices and masks:

1. :func:`session_extents`: the foreground extent of each session along the three anatomical
   axes, from the label files.
2. :class:`Condition`: one way of spending the budget (``n_subjects`` subjects, each with a
   ``fraction`` of its slices or a fixed ``slices_per_subject``, along a ``plane``).
   :func:`budget_design` lays out the paper's Table 3, :func:`sweep_design` the dispersion
   sweep, and :func:`plan_budget` both, with the participants of every condition
   (:func:`assign_subjects`: age-representative draws).
3. :func:`slice_table`: the annotated slices, seeded, saved with :func:`write_slices` as a TSV
   (one row per slice) so a run can be reproduced and audited.
4. :func:`write_masks` writes the masks as ``uint8`` NIfTI files with the label's affine;
   :func:`condition_records` adds their paths as the ``annotation`` key of the training
   records, which :mod:`neonb.transforms` loads and moves with image and label.
5. :func:`condition_config`, :func:`neonb.experiment.evaluate` and :func:`condition_results`: equal
   epochs or equal steps per condition, whole-volume Dice, and one results row per
   condition.

Definitions used throughout:

* **Foreground extent** along an axis: the half-open range ``[start, stop)`` of voxel indices
  whose slice holds a label other than 0. Label 0 is the outer background, the zero-intensity
  region around the head; the inner background (label 4, non-brain tissue inside the skull)
  counts as foreground. This is the bounding box that pre-processing crops every training
  volume to (the non-zero voxels of the image), so the "brain's extent" is the training
  volume's extent along that axis. Its length ``L`` is the number of slices of a fully
  labelled volume along the axis.
* **Slices per subject**: ``round(fraction * L)``, at least 1; for the random plane,
  ``round(fraction * mean(L))`` over the three axes, each slice on a uniformly drawn plane.
* **Margin**: slices are never taken from the outer ``margin`` (default 10 %) of the extent at
  either end: the first and last ``ceil(margin * L)`` slices are excluded. This is neonb's
  reading of the paper's "outermost 10 % along each axis" (§3.4.1); the authors' public code
  excludes 5 % of the whole image at each end (10 % in all), before cropping.
* **Placement**: ``"equidistant"`` puts the ``n`` slices at the centres of ``n`` equal runs of
  the eligible slices (33 % of the slices of the inner 80 %: about every 2.4th slice);
  ``"random"`` draws them without replacement, as the authors' public code does. The
  default, equidistant, is neonb's choice; the paper does not say.
* **Random plane**: neonb draws a plane for each slice (its reading of "or at random",
  §3.4); the authors' public code draws one plane per volume.
* **Planes** are anatomical and found from the affine (``nibabel.aff2axcodes``): sagittal
  slices are perpendicular to the left-right axis (voxel axis 0 of a RAS image), coronal to
  anterior-posterior, axial to superior-inferior.

Example:
    >>> extents = session_extents(pool_records)
    >>> plan = plan_budget(pool_ages, train_ids, extents, n_full=4, seed=0)
    >>> slices = slice_table(plan.conditions, plan.sessions(pool_records), extents, seed=0)
    >>> masks = write_masks(slices, pool_records, "results/demo/03_budgeting/masks")
    >>> axial = condition_records(pool_records, plan.participants["axial"], masks, "axial")
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from neonb import paper
from neonb.errors import ConfigError, DataError
from neonb.experiment import TrainingConfig
from neonb.files import atomic_write, read_id_table, write_id_table
from neonb.splits import stratified_pick
from neonb.statistics import Claim, check_claims

__all__ = [
    "AXIS_MODES",
    "BudgetPlan",
    "PLACEMENTS",
    "PLANES",
    "Condition",
    "annotation_mask",
    "assign_subjects",
    "budget_design",
    "budget_slices",
    "condition_records",
    "condition_results",
    "condition_config",
    "condition_summary",
    "eligible_slices",
    "extent_lengths",
    "foreground_extent",
    "gradient_probe",
    "mask_follows_augmentation",
    "full_conditions",
    "mask_filename",
    "other_schedule_condition",
    "other_schedule_config",
    "paper_claims",
    "paper_findings",
    "place_slices",
    "plan_budget",
    "plane_axis",
    "read_slices",
    "select_slices",
    "session_extents",
    "slice_count",
    "slice_table",
    "sweep_design",
    "evaluation_subset",
    "write_masks",
    "write_slices",
]

PLANES: tuple[str, str, str] = ("sagittal", "coronal", "axial")
"""Anatomical slice planes, in RAS voxel-axis order."""

AXIS_MODES: tuple[str, str, str, str] = (*PLANES, "random")
"""Slicing modes: a fixed plane, or a plane drawn at random for each slice."""

PLACEMENTS: tuple[str, str] = ("equidistant", "random")
"""How slices are placed within the eligible range."""

MARGIN = 0.1
"""Default fraction of the foreground extent excluded at either end: neonb's reading of the
paper's "outermost 10 % along each axis" (§3.4.1) as 10 % at each end; the authors' public
code excludes 5 % of the image at each end."""

FULL = "full"
"""``Condition.plane`` of fully labelled volumes."""

_PLANE_CODES = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}
"""``nibabel.aff2axcodes`` letters of the axis each plane is perpendicular to."""

SLICE_COLUMNS = [
    "condition",
    "participant_id",
    "session_id",
    "plane",
    "axis",
    "slice",
    "extent_start",
    "extent_stop",
]
"""Columns of the slices TSV: one row per annotated slice; ``axis`` is the voxel axis."""

EXTENT_COLUMNS = [
    "participant_id",
    "session_id",
    "orientation",
    *(f"{plane}_{end}" for plane in PLANES for end in ("start", "stop")),
]
"""Columns of :func:`session_extents`: the foreground ``[start, stop)`` along each plane's axis."""

_NAME = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Condition:
    """One way of spending the label budget.

    Attributes:
        name: alphanumeric name, used in file names (``desc-<name>``) and tables.
        n_subjects: number of training sessions that get annotations.
        plane: ``"full"`` (every voxel annotated), a plane of :data:`PLANES`, or ``"random"``.
        fraction: fraction of each subject's slices that is annotated, in (0, 1 - 2 margin];
            ``None`` when ``slices_per_subject`` is given or for full volumes.
        slices_per_subject: a fixed number of slices per subject (e.g. 1); ``None`` otherwise.
        placement: ``"equidistant"`` or ``"random"``.
        margin: fraction of the extent excluded at either end, in [0, 0.5).

    Raises:
        ConfigError: for a bad name, plane, placement, count or fraction, or when neither or
            both of ``fraction`` and ``slices_per_subject`` are given for a partial condition.
    """

    name: str
    n_subjects: int
    plane: str = FULL
    fraction: float | None = None
    slices_per_subject: int | None = None
    placement: str = "equidistant"
    margin: float = MARGIN

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"condition names must be alphanumeric, but found {self.name!r}")
        if isinstance(self.n_subjects, bool) or int(self.n_subjects) != self.n_subjects:
            raise ConfigError(f"n_subjects must be an integer, but found {self.n_subjects!r}")
        if self.n_subjects < 1:
            raise ConfigError(f"n_subjects must be at least 1, but found {self.n_subjects!r}")
        if self.plane not in (FULL, *AXIS_MODES):
            raise ConfigError(
                f"plane must be one of {[FULL, *AXIS_MODES]}, but found {self.plane!r}"
            )
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"placement must be one of {list(PLACEMENTS)}, but found {self.placement!r}"
            )
        if not 0.0 <= self.margin < 0.5:
            raise ConfigError(f"margin must be in [0, 0.5), but found {self.margin!r}")
        if self.is_full:
            if self.fraction is not None or self.slices_per_subject is not None:
                raise ConfigError(f"the full condition {self.name!r} takes no fraction or count")
            return
        if (self.fraction is None) == (self.slices_per_subject is None):
            raise ConfigError(
                f"condition {self.name!r}: give exactly one of fraction and slices_per_subject"
            )
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0 - 2 * self.margin:
            raise ConfigError(
                f"fraction must be in (0, {1 - 2 * self.margin:g}] (the slices inside the "
                f"margins), but found {self.fraction!r}"
            )
        if self.slices_per_subject is not None and self.slices_per_subject < 1:
            raise ConfigError(
                f"slices_per_subject must be at least 1, but found {self.slices_per_subject!r}"
            )

    @property
    def is_full(self) -> bool:
        """Whether every voxel of the condition's volumes is annotated (no mask needed)."""
        return self.plane == FULL

    def describe(self) -> str:
        """A short human-readable description, e.g. ``"33 % of axial slices, 12 subjects"``."""
        if self.is_full:
            what = "full volumes"
        elif self.fraction is not None:
            what = f"{100 * self.fraction:.0f} % of {self.plane} slices"
        else:
            count = self.slices_per_subject
            what = f"{count} {self.plane} slice{'s' * (count != 1)} per subject"
        return f"{what}, {self.n_subjects} subject{'s' * (self.n_subjects != 1)}"

    def slices_for(self, lengths: Mapping[str, int]) -> int:
        """Slices annotated in a session whose foreground extent is ``lengths[plane]`` long.

        Raises:
            ConfigError: for the full condition, whose slice count depends on the plane
                they are counted along (see :func:`budget_slices`).
        """
        if self.is_full:
            raise ConfigError("a full volume has as many slices as its extent along a plane")
        if self.slices_per_subject is not None:
            return int(self.slices_per_subject)
        if self.plane == "random":
            mean = float(np.mean([lengths[p] for p in PLANES]))
            return slice_count(mean, self.fraction)
        return slice_count(lengths[self.plane], self.fraction)


def budget_design(
    n_full: int,
    *,
    planes: Sequence[str] = ("random", "sagittal", "coronal", "axial"),
    dispersion: int = 3,
    placement: str = "equidistant",
    margin: float = MARGIN,
) -> list[Condition]:
    """The conditions of the paper's Table 3: full volumes against dispersed slices.

    At a dispersion ``k`` the budget of ``n_full`` fully labelled volumes is spread over
    ``k * n_full`` subjects with ``1/k`` of their slices each, so every condition annotates
    about the same number of slices (paper: ``k = 3``, "33 %" on three times the subjects).

    Args:
        n_full: subjects with fully labelled volumes (paper: 114).
        planes: slicing modes, from :data:`AXIS_MODES`; each gives a condition of that name.
        dispersion: the dispersion factor ``k`` (paper: 3).
        placement: ``"equidistant"`` or ``"random"``.
        margin: fraction of the extent excluded at either end.

    Returns:
        ``full`` (``n_full`` subjects), then one condition per plane.

    Raises:
        ConfigError: for an unknown plane or a dispersion below 2.
    """
    _check_design(planes, [dispersion])
    common = {"placement": placement, "margin": margin}
    return [Condition(FULL, n_full, **common)] + [
        Condition(plane, dispersion * n_full, plane, fraction=1 / dispersion, **common)
        for plane in planes
    ]


def sweep_design(
    n_full: int,
    *,
    plane: str = "axial",
    dispersions: Sequence[int] = (3, 10),
    one_slice_subjects: int | None = None,
    prefix: str = "",
    placement: str = "equidistant",
    margin: float = MARGIN,
) -> list[Condition]:
    """The dispersion sweep along one plane, at the budget of ``n_full`` full volumes.

    Conditions: ``<prefix>full``; for each ``k`` of ``dispersions``, ``1/k`` of the slices on
    ``k * n_full`` subjects, named ``<prefix><plane><percent>`` (``axial10``), except for
    ``k = 3``, named ``<prefix><plane>`` like the Table 3 condition it equals; and
    ``<prefix><plane>1slice``, one slice on each of ``one_slice_subjects`` subjects (to spend
    the same budget, as many subjects as the full volumes have slices, see
    :func:`budget_slices`; ``None`` leaves it out).

    Raises:
        ConfigError: for an unknown plane or a dispersion below 2.
    """
    _check_design([plane], dispersions)
    common = {"placement": placement, "margin": margin}
    conditions = [Condition(f"{prefix}{FULL}", n_full, **common)]
    for k in dispersions:
        name = f"{prefix}{plane}" + ("" if k == 3 else str(round(100 / k)))
        conditions.append(Condition(name, k * n_full, plane, fraction=1 / k, **common))
    if one_slice_subjects is not None:
        conditions.append(
            Condition(
                f"{prefix}{plane}1slice", one_slice_subjects, plane, slices_per_subject=1, **common
            )
        )
    return conditions


def _check_design(planes: Sequence[str], dispersions: Sequence[int]) -> None:
    for plane in planes:
        if plane not in AXIS_MODES:
            raise ConfigError(f"planes must be among {list(AXIS_MODES)}, but found {plane!r}")
    for k in dispersions:
        if isinstance(k, bool) or int(k) != k or k < 2:
            raise ConfigError(f"dispersion factors must be integers >= 2, but found {k!r}")


@dataclass
class BudgetPlan:
    """Who gets which annotations: the conditions and their participants.

    Attributes:
        conditions: every condition to train, each once (shared ones appear once).
        participants: participant ids per condition name.
        table3: names of the Table 3 conditions.
        sweep: names of the sweep conditions, least dispersed first.
        notes: sentences about adjustments (a condition capped at the pool size).
    """

    conditions: list[Condition]
    participants: dict[str, list[str]]
    table3: list[str]
    sweep: list[str]
    notes: list[str]

    def sessions(self, records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
        """``condition, participant_id, session_id`` of every condition's sessions.

        Args:
            records: the pool's session records; a participant's every session is taken.
        """
        rows = [
            (name, str(r["participant_id"]), str(r["session_id"]))
            for name, ids in self.participants.items()
            for r in records
            if str(r["participant_id"]) in set(ids)
        ]
        return pd.DataFrame(rows, columns=["condition", "participant_id", "session_id"])


def plan_budget(
    pool_ages: pd.Series,
    train_ids: Sequence[str],
    extents: pd.DataFrame,
    *,
    n_full: int,
    planes: Sequence[str] = ("random", "sagittal", "coronal", "axial"),
    dispersion: int = 3,
    sweep_plane: str | None = "axial",
    sweep_dispersions: Sequence[int] = (3, 10),
    sweep_n_full: int | None = None,
    one_slice: bool = True,
    placement: str = "equidistant",
    margin: float = MARGIN,
    seed: int = 0,
) -> BudgetPlan:
    """Lay out the Table 3 conditions and the dispersion sweep, and draw their participants.

    The ``n_full`` fully labelled participants are an age-representative draw from
    ``train_ids`` (the pipeline's training split); every other condition takes them plus an
    age-representative draw from the rest of the pool (:func:`assign_subjects`). The sweep
    has the budget of ``sweep_n_full`` full volumes; when that equals ``n_full`` it shares
    ``full`` and the 33 % condition with Table 3, otherwise its conditions are prefixed
    ``sweep``. A sweep condition that needs more participants than the pool holds (one slice
    per subject, usually) is capped at the pool, and a note says so.

    Args:
        pool_ages: scan age (weeks) by participant id, for every participant that may be
            annotated (outside the validation and test splits).
        train_ids: the pipeline's training participants (a subset of the pool).
        extents: :func:`session_extents` of the pool.
        n_full: fully labelled participants of Table 3 (paper: 114).
        planes: the Table 3 slicing modes.
        dispersion: the Table 3 dispersion factor (paper: 3).
        sweep_plane: plane of the sweep, or ``None`` for no sweep.
        sweep_dispersions: the sweep's dispersion factors besides full volumes and one slice.
        sweep_n_full: the sweep's budget in full volumes (``None``: ``n_full``).
        one_slice: add the one-slice-per-subject condition to the sweep.
        placement: ``"equidistant"`` or ``"random"``.
        margin: fraction of the extent excluded at either end.
        seed: fixes every draw.

    Raises:
        ConfigError: when a Table 3 condition needs more participants than the pool holds,
            or the training split has fewer than ``n_full``.
    """
    pool_ages = pool_ages.copy()
    pool_ages.index = pool_ages.index.astype(str)
    train = pool_ages[pool_ages.index.isin([str(p) for p in train_ids])]
    if n_full > len(train):
        raise ConfigError(f"n_full is {n_full} but the training split has {len(train)}")
    full_ids = stratified_pick(train, n_full, np.random.default_rng([seed, n_full]))
    table3 = budget_design(
        n_full, planes=planes, dispersion=dispersion, placement=placement, margin=margin
    )
    participants = assign_subjects(table3, pool_ages, full_ids, seed=seed)
    conditions = list(table3)
    notes: list[str] = []
    sweep: list[Condition] = []
    if sweep_plane:
        n_sweep = n_full if sweep_n_full is None else sweep_n_full
        shared = n_sweep == n_full
        # the sweep's full volumes: Table 3's, or a draw among them (or the training split)
        candidates = train[full_ids] if n_sweep <= n_full else train
        sweep_full = (
            full_ids
            if shared
            else stratified_pick(candidates, n_sweep, np.random.default_rng([seed, n_sweep]))
        )
        one = budget_slices(extents, sweep_full, sweep_plane) if one_slice else None
        sweep = sweep_design(
            n_sweep,
            plane=sweep_plane,
            dispersions=sweep_dispersions,
            one_slice_subjects=one,
            prefix="" if shared else "sweep",
            placement=placement,
            margin=margin,
        )
        sweep = [_capped(c, len(pool_ages), notes) for c in sweep]
        drawn = assign_subjects(sweep, pool_ages, sweep_full, seed=seed)
        known = {c.name: c for c in conditions}
        for condition in sweep:
            if condition.name in known:
                if known[condition.name] != condition:
                    raise ConfigError(f"two different conditions are named {condition.name!r}")
                continue
            conditions.append(condition)
            participants[condition.name] = drawn[condition.name]
    return BudgetPlan(
        conditions,
        participants,
        [c.name for c in table3],
        [c.name for c in sweep],
        notes,
    )


def _capped(condition: Condition, available: int, notes: list[str]) -> Condition:
    if condition.n_subjects <= available:
        return condition
    notes.append(
        f"{condition.name}: {condition.describe()} would need {condition.n_subjects} "
        f"participants to spend the whole budget, but the pool has {available}; it uses all "
        f"{available}, so it annotates fewer slices than the other conditions"
    )
    return dataclasses.replace(condition, n_subjects=available)


def plane_axis(affine: np.ndarray, plane: str) -> int:
    """The voxel axis a plane's slices are perpendicular to, read from the affine.

    Args:
        affine: the image's 4x4 voxel-to-world (RAS+ mm) matrix.
        plane: ``"sagittal"``, ``"coronal"`` or ``"axial"``.

    Returns:
        0, 1 or 2: for a RAS image, sagittal 0, coronal 1, axial 2.

    Example:
        >>> plane_axis(np.eye(4), "sagittal")
        0
    """
    if plane not in PLANES:
        raise ConfigError(f"plane must be one of {list(PLANES)}, but found {plane!r}")
    return _axis_of("".join(nib.aff2axcodes(np.asarray(affine))), plane)


def _axis_of(orientation: str, plane: str) -> int:
    """Voxel axis of ``plane`` in an image with axis codes ``orientation`` (e.g. ``"RAS"``)."""
    return next(axis for axis, code in enumerate(orientation) if code in _PLANE_CODES[plane])


def foreground_extent(volume: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open ``[start, stop)`` range of the non-zero voxels along each axis.

    Args:
        volume: labels (or intensities), shape ``(X, Y, Z)``.

    Returns:
        ``((x0, x1), (y0, y1), (z0, z1))``.

    Raises:
        ConfigError: when the volume has no non-zero voxel.
    """
    volume = np.asarray(volume)
    extent = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        hits = np.flatnonzero(np.any(volume != 0, axis=others))
        if hits.size == 0:
            raise ConfigError("the volume has no non-zero voxel, so no foreground extent")
        extent.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(extent)


def session_extents(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Foreground extent of each session's label along each plane's voxel axis.

    Args:
        records: sessions with ``label`` (a drawem9 NIfTI path), ``participant_id`` and
            ``session_id``.

    Returns:
        One row per session, :data:`EXTENT_COLUMNS`: ids, ``orientation`` (axis codes such
        as ``"RAS"``) and ``<plane>_start``, ``<plane>_stop`` in voxels.
    """
    rows = []
    for record in records:
        image = nib.load(record["label"])
        extent = foreground_extent(np.asanyarray(image.dataobj))
        row = {
            "participant_id": str(record["participant_id"]),
            "session_id": str(record["session_id"]),
            "orientation": "".join(nib.aff2axcodes(image.affine)),
        }
        for plane in PLANES:
            start, stop = extent[plane_axis(image.affine, plane)]
            row |= {f"{plane}_start": start, f"{plane}_stop": stop}
        rows.append(row)
    return pd.DataFrame(rows, columns=EXTENT_COLUMNS)


EXTENT_CACHE_KEYS = ["label", "label_bytes", "label_mtime_ns"]
"""Columns that tie a cached extent to its label file: path, size and modification time."""


def cached_extents(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pd.DataFrame:
    """:func:`session_extents`, computed once per label file and kept in a TSV at ``path``.

    Reading every label image of a paper-scale pool takes minutes, and both the plan
    (``neonb study --plan``) and the budgeting chapter need the extents; a row is reused
    while its label file has the same path, size and modification time, and computed
    otherwise.

    Returns:
        :data:`EXTENT_COLUMNS` for ``records``, in their order.
    """
    path = Path(path)
    columns = [*EXTENT_COLUMNS, *EXTENT_CACHE_KEYS]
    known: dict[tuple[str, int, int], dict[str, Any]] = {}
    if path.is_file():
        cached = pd.read_csv(
            path, sep="\t", dtype={"participant_id": str, "session_id": str, "label": str}
        )
        if set(columns) <= set(cached.columns):
            known = {
                (row["label"], int(row["label_bytes"]), int(row["label_mtime_ns"])): row
                for row in cached[columns].to_dict("records")
            }
    keys = [_label_key(record) for record in records]
    missing = [record for record, key in zip(records, keys, strict=True) if key not in known]
    for record, row in zip(missing, session_extents(missing).to_dict("records"), strict=True):
        key = _label_key(record)
        known[key] = {**row, **dict(zip(EXTENT_CACHE_KEYS, key, strict=True))}
    table = pd.DataFrame([known[key] for key in keys], columns=columns)
    if missing:
        write_id_table(table, columns, path)
    return table[EXTENT_COLUMNS].reset_index(drop=True)


def _label_key(record: Mapping[str, Any]) -> tuple[str, int, int]:
    label = Path(record["label"])
    try:
        stat = label.stat()
    except OSError as err:
        raise DataError(label, f"cannot be read: {err}") from err
    return str(label), stat.st_size, stat.st_mtime_ns


def budget_pool(
    manifest: pd.DataFrame, pipeline_splits: pd.DataFrame, *, brain_mask: str = "ignore"
) -> tuple[list[dict[str, Any]], pd.Series, list[str]]:
    """The sessions annotations may be spent on: the pipeline's training and pool sessions.

    Validation and test sessions stay fully labelled, and sessions the splits left out
    (:data:`neonb.splits.EXCLUDED`) are not used, so every pooled participant has one session.

    Args:
        manifest: the cohort's manifest.
        pipeline_splits: the study's pipeline splits (:func:`neonb.splits.pipeline_splits`).
        brain_mask: whether the records carry the brain mask (:func:`neonb.data.to_data_dicts`).

    Returns:
        ``(records, ages, train_ids)``: the pool's data dicts
        (:func:`neonb.data.to_data_dicts`), its scan ages (weeks) by participant id, and the
        participants of the pipeline's training split.
    """
    from neonb.data import to_data_dicts
    from neonb.splits import POOL

    pooled = pipeline_splits[pipeline_splits["split"].isin(["train", POOL])]
    keys = manifest.astype({"participant_id": str, "session_id": str})
    rows = pooled[["participant_id", "session_id", "split"]].merge(
        keys, on=["participant_id", "session_id"], how="inner"
    )
    ages = pd.Series(rows["scan_age"].to_numpy(float), index=rows["participant_id"].to_numpy())
    train_ids = rows.loc[rows["split"] == "train", "participant_id"].tolist()
    return to_data_dicts(rows.drop(columns="split"), brain_mask=brain_mask), ages, train_ids


def slice_count(length: float, fraction: float) -> int:
    """Slices to annotate: ``round(fraction * length)``, at least 1.

    Args:
        length: foreground extent along the axis, in slices.
        fraction: fraction of the slices to annotate, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], but found {fraction!r}")
    return max(1, round(fraction * length))


def eligible_slices(start: int, stop: int, margin: float = MARGIN) -> np.ndarray:
    """Slice indices in ``[start, stop)`` outside the outer ``margin`` at either end.

    The first and last ``ceil(margin * (stop - start))`` slices are excluded, so every
    eligible slice is at least ``margin * length`` slices from either end of the extent.

    Raises:
        ConfigError: for an empty range or a margin that leaves no slice.
    """
    length = stop - start
    if length < 1:
        raise ConfigError(f"empty extent [{start}, {stop})")
    cut = math.ceil(margin * length - 1e-9)
    candidates = np.arange(start + cut, stop - cut)
    if candidates.size == 0:
        raise ConfigError(f"a margin of {margin:g} leaves no slice of the extent [{start}, {stop})")
    return candidates


def place_slices(
    candidates: np.ndarray, n: int, placement: str, rng: np.random.Generator
) -> np.ndarray:
    """Choose ``n`` of ``candidates`` (sorted, contiguous), equidistant or at random.

    Equidistant: the centres of ``n`` equal runs of the candidates, so 1 slice is the middle
    one and 33 % is about every third slice. Random: ``n`` drawn without replacement.

    Returns:
        The chosen indices, sorted.

    Raises:
        ConfigError: when ``n`` exceeds the number of candidates or the placement is unknown.
    """
    m = len(candidates)
    if not 1 <= n <= m:
        raise ConfigError(f"cannot place {n} slices among {m} eligible ones")
    if placement == "equidistant":
        return candidates[((np.arange(n) + 0.5) * m / n).astype(int)]
    if placement == "random":
        return np.sort(rng.choice(candidates, size=n, replace=False))
    raise ConfigError(f"placement must be one of {list(PLACEMENTS)}, but found {placement!r}")


def select_slices(
    extents: Mapping[str, Any], condition: Condition, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """The annotated ``(plane, slice)`` pairs of one session under ``condition``.

    Args:
        extents: one row of :func:`session_extents` (``<plane>_start``, ``<plane>_stop``).
        condition: a partial condition (not ``"full"``).
        rng: random generator for the random plane and random placement.

    Returns:
        ``(plane, voxel index)`` pairs, by plane then index.
    """
    if condition.is_full:
        raise ConfigError("full volumes have no slice selection")
    candidates = {
        plane: eligible_slices(
            int(extents[f"{plane}_start"]), int(extents[f"{plane}_stop"]), condition.margin
        )
        for plane in PLANES
    }
    lengths = {p: int(extents[f"{p}_stop"]) - int(extents[f"{p}_start"]) for p in PLANES}
    n = condition.slices_for(lengths)
    if condition.plane == "random":
        counts = _random_plane_counts(n, {p: len(c) for p, c in candidates.items()}, rng)
    else:
        counts = {condition.plane: n}
    chosen = []
    for plane in PLANES:
        if counts.get(plane, 0):
            picked = place_slices(candidates[plane], counts[plane], condition.placement, rng)
            chosen += [(plane, int(index)) for index in picked]
    return chosen


def _random_plane_counts(
    n: int, capacity: Mapping[str, int], rng: np.random.Generator
) -> dict[str, int]:
    """Draw a plane for each of ``n`` slices uniformly among the planes with room left."""
    if n > sum(capacity.values()):
        raise ConfigError(f"cannot place {n} slices among {sum(capacity.values())} eligible ones")
    counts = dict.fromkeys(PLANES, 0)
    for _ in range(n):
        open_planes = [p for p in PLANES if counts[p] < capacity[p]]
        counts[open_planes[int(rng.integers(len(open_planes)))]] += 1
    return counts


def _session_rng(seed: int, condition: str, participant_id: str, session_id: str):
    """A generator that depends only on the seed, the condition and the session."""
    words = [seed, *(zlib.crc32(s.encode()) for s in (condition, participant_id, session_id))]
    return np.random.default_rng(words)


def slice_table(
    conditions: Sequence[Condition],
    sessions: pd.DataFrame,
    extents: pd.DataFrame,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """The annotated slices of every partial condition, one row per slice.

    The draw for a session depends only on ``seed``, the condition's name and the session, so
    adding a condition or a session leaves the other selections unchanged.

    Args:
        conditions: the design (:func:`budget_design`); full conditions add no rows.
        sessions: ``condition, participant_id, session_id`` rows (:func:`assign_subjects`).
        extents: :func:`session_extents` of those sessions.
        seed: fixes the selection.

    Returns:
        :data:`SLICE_COLUMNS`.

    Raises:
        ConfigError: when a session has no extent row.
    """
    keyed = extents.astype({"participant_id": str, "session_id": str}).set_index(
        ["participant_id", "session_id"]
    )
    rows = []
    for condition in conditions:
        if condition.is_full:
            continue
        part = sessions[sessions["condition"] == condition.name]
        for pid, sid in zip(part["participant_id"], part["session_id"], strict=True):
            key = (str(pid), str(sid))
            if key not in keyed.index:
                raise ConfigError(f"no extent for sub-{pid} ses-{sid}; run session_extents")
            row = keyed.loc[key]
            rng = _session_rng(seed, condition.name, *key)
            for plane, index in select_slices(row, condition, rng):
                rows.append(
                    {
                        "condition": condition.name,
                        "participant_id": key[0],
                        "session_id": key[1],
                        "plane": plane,
                        "axis": _axis_of(row["orientation"], plane),
                        "slice": index,
                        "extent_start": int(row[f"{plane}_start"]),
                        "extent_stop": int(row[f"{plane}_stop"]),
                    }
                )
    return pd.DataFrame(rows, columns=SLICE_COLUMNS)


def annotation_mask(shape: Sequence[int], slices: pd.DataFrame) -> np.ndarray:
    """The mask of one session: 1 on every annotated slice, 0 elsewhere.

    Args:
        shape: the image grid ``(X, Y, Z)``.
        slices: rows of :func:`slice_table` for one session and condition (``axis``,
            ``slice``).

    Returns:
        ``uint8`` array of ``shape``.
    """
    mask = np.zeros(tuple(shape), dtype=np.uint8)
    for axis, index in zip(slices["axis"], slices["slice"], strict=True):
        where = [slice(None)] * mask.ndim
        where[int(axis)] = int(index)
        mask[tuple(where)] = 1
    return mask


def mask_filename(participant_id: str, session_id: str, condition: str) -> str:
    """BIDS-like name of a mask: ``sub-X_ses-Y_desc-<condition>_mask.nii.gz``."""
    return f"sub-{participant_id}_ses-{session_id}_desc-{condition}_mask.nii.gz"


def write_masks(
    slices: pd.DataFrame,
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
) -> pd.DataFrame:
    """Write the annotation mask of every (condition, session) of ``slices`` as NIfTI.

    Each mask is ``uint8`` on the grid of the session's label, with its affine, named by
    :func:`mask_filename`.

    Args:
        slices: :func:`slice_table` rows.
        records: sessions with ``label`` paths and ids (a superset of those in ``slices``).
        out_dir: folder of the masks (created).

    Returns:
        One row per mask: ``condition, participant_id, session_id, mask`` (path),
        ``n_slices`` and ``annotated_fraction`` (of the voxels in the foreground box).

    Raises:
        DataError: when a session of ``slices`` has no record.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_key = {(str(r["participant_id"]), str(r["session_id"])): r for r in records}
    rows = []
    for (condition, pid, sid), part in slices.groupby(
        ["condition", "participant_id", "session_id"], sort=False
    ):
        record = by_key.get((str(pid), str(sid)))
        if record is None:
            raise DataError(f"sub-{pid}/ses-{sid}", "has slices but no session record")
        label = nib.load(record["label"])
        mask = annotation_mask(label.shape[:3], part)
        path = out_dir / mask_filename(pid, sid, condition)
        image = nib.Nifti1Image(mask, label.affine)
        image.set_data_dtype(np.uint8)
        atomic_write(path, lambda tmp, image=image: nib.save(image, tmp))
        box = tuple(slice(*e) for e in foreground_extent(np.asanyarray(label.dataobj)))
        rows.append(
            {
                "condition": condition,
                "participant_id": str(pid),
                "session_id": str(sid),
                "mask": str(path),
                "n_slices": len(part),
                "annotated_fraction": float(mask[box].mean()),
            }
        )
    return pd.DataFrame(rows)


def assign_subjects(
    conditions: Sequence[Condition],
    pool_ages: pd.Series,
    full_ids: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The participants of each condition.

    Every condition includes the ``full_ids`` (the fully labelled subjects, when it has at
    least as many subjects) plus an age-representative draw
    (:func:`neonb.splits.stratified_pick`) of the rest from the pool, seeded by ``seed`` and
    the number of subjects only: conditions of equal size get the same subjects, so the
    slicing planes of Table 3 are compared on the same sessions.

    Args:
        conditions: the design.
        pool_ages: scan age (weeks) indexed by participant id: every participant that may be
            annotated (those outside the validation and test splits).
        full_ids: the participants of the full condition, drawn beforehand.
        seed: fixes the draws.

    Returns:
        Participant ids per condition name, in pool order.

    Raises:
        ConfigError: when a condition needs more participants than the pool holds.
    """
    pool_ages = pool_ages.copy()
    pool_ages.index = pool_ages.index.astype(str)
    full_ids = [str(p) for p in full_ids]
    missing = sorted(set(full_ids) - set(pool_ages.index))
    if missing:
        raise ConfigError(f"full-label participants {missing} are not in the pool")
    assigned = {}
    for condition in conditions:
        n = condition.n_subjects
        if n > len(pool_ages):
            raise ConfigError(
                f"condition {condition.name!r} needs {n} participants but the pool has "
                f"{len(pool_ages)}; lower n_full or the dispersion"
            )
        if n <= len(full_ids):
            rng = np.random.default_rng([seed, n])
            chosen = set(stratified_pick(pool_ages[full_ids], n, rng))
        else:
            rest = pool_ages.drop(full_ids)
            rng = np.random.default_rng([seed, n])
            chosen = set(full_ids) | set(stratified_pick(rest, n - len(full_ids), rng))
        assigned[condition.name] = [p for p in pool_ages.index if p in chosen]
    return assigned


def budget_slices(extents: pd.DataFrame, participants: Sequence[str], plane: str) -> int:
    """Total slices along ``plane`` of the fully labelled volumes of ``participants``.

    This is the budget in slices that every condition spends; the one-slice condition needs
    as many subjects.
    """
    part = extents[extents["participant_id"].astype(str).isin([str(p) for p in participants])]
    return int((part[f"{plane}_stop"] - part[f"{plane}_start"]).sum())


def condition_records(
    records: Iterable[Mapping[str, Any]],
    participants: Sequence[str],
    masks: pd.DataFrame | None = None,
    condition: str | None = None,
) -> list[dict[str, Any]]:
    """Training records of one condition, each with its ``annotation`` mask path.

    Args:
        records: session records (:func:`neonb.data.to_data_dicts`).
        participants: the condition's participants (:func:`assign_subjects`).
        masks: :func:`write_masks` rows; ``None`` for full volumes (no ``annotation`` key:
            the transforms then annotate every voxel).
        condition: the condition's name, to pick its masks.

    Returns:
        Copies of the matching records, in ``records`` order, with ``annotation`` set.

    Raises:
        DataError: when a session of a partial condition has no mask.
    """
    wanted = {str(p) for p in participants}
    chosen = [dict(r) for r in records if str(r["participant_id"]) in wanted]
    if masks is None:
        return chosen
    mine = masks[masks["condition"] == condition].set_index(["participant_id", "session_id"])
    for record in chosen:
        key = (str(record["participant_id"]), str(record["session_id"]))
        if key not in mine.index:
            raise DataError(
                f"sub-{key[0]}/ses-{key[1]}", f"has no mask for condition {condition!r}"
            )
        record["annotation"] = mine.loc[key, "mask"]
    return chosen


def condition_summary(
    conditions: Sequence[Condition],
    assigned: Mapping[str, Sequence[str]],
    extents: pd.DataFrame,
    masks: pd.DataFrame | None = None,
    *,
    full_plane: str = "axial",
) -> pd.DataFrame:
    """One row per condition: what was annotated, and how much.

    Args:
        conditions: the design.
        assigned: participants per condition (:func:`assign_subjects`).
        extents: :func:`session_extents` rows of the pool.
        masks: :func:`write_masks` rows, for the slice counts and annotated voxel fractions.
        full_plane: the plane along which a full volume's slices are counted.

    Returns:
        ``condition, description, plane, fraction, n_subjects`` (participants),
        ``n_sessions`` (a participant scanned twice brings both sessions),
        ``annotated_slices``, ``slices_per_session``, ``annotated_voxel_fraction``.
    """
    rows = []
    for condition in conditions:
        ids = [str(p) for p in assigned[condition.name]]
        if condition.is_full:
            slices = budget_slices(extents, ids, full_plane)
            n_sessions = int(extents["participant_id"].astype(str).isin(ids).sum())
            voxel_fraction = 1.0
        else:
            mine = masks[masks["condition"] == condition.name]
            slices = int(mine["n_slices"].sum())
            n_sessions = len(mine)
            voxel_fraction = float(mine["annotated_fraction"].mean())
        rows.append(
            {
                "condition": condition.name,
                "description": condition.describe(),
                "plane": condition.plane,
                "fraction": 1.0 if condition.is_full else condition.fraction,
                "n_subjects": len(ids),
                "n_sessions": n_sessions,
                "annotated_slices": slices,
                "slices_per_session": slices / n_sessions,
                "annotated_voxel_fraction": voxel_fraction,
            }
        )
    return pd.DataFrame(rows)


def annotated_slices(
    conditions: Sequence[Condition],
    assigned: Mapping[str, Sequence[str]],
    extents: pd.DataFrame,
    slices: pd.DataFrame,
    *,
    full_plane: str = "axial",
) -> dict[str, int]:
    """The annotated slices each condition spends, by condition name.

    Full volumes count their slices along ``full_plane`` within the head's extent; a
    partial condition counts its rows of ``slices`` (:func:`slice_table`).
    """
    chosen = slices.groupby("condition").size()
    return {
        c.name: (
            budget_slices(extents, [str(p) for p in assigned[c.name]], full_plane)
            if c.is_full
            else int(chosen.get(c.name, 0))
        )
        for c in conditions
    }


def write_slices(slices: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a slices table (:data:`SLICE_COLUMNS`) as TSV, atomically. Returns the path written."""
    return write_id_table(slices, SLICE_COLUMNS, path)


def read_slices(path: str | os.PathLike) -> pd.DataFrame:
    """Read a slices TSV written by :func:`write_slices`.

    Raises:
        DataError: if the file is missing or lacks a column of :data:`SLICE_COLUMNS`.
    """
    return read_id_table(path, SLICE_COLUMNS, "slices")


SCHEDULES = ("epochs", "steps")
"""How training length is matched across conditions."""


def condition_config(
    config: TrainingConfig,
    n_subjects: int,
    *,
    schedule: str = "epochs",
    samples_per_epoch: int | None = None,
) -> TrainingConfig:
    """The training settings of a condition with ``n_subjects`` training volumes.

    ``"epochs"`` (the paper's choice): ``config`` unchanged, so a condition with three times
    the subjects takes three times the optimiser steps. ``"steps"``: every condition draws
    about ``samples_per_epoch`` patches per epoch (``samples_per_volume =
    max(1, round(samples_per_epoch / n_subjects))``), so all take about the same number of
    steps and differ only in where the annotated slices are.

    Raises:
        ConfigError: for an unknown schedule, or ``"steps"`` without ``samples_per_epoch``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, but found {schedule!r}")
    if schedule == "epochs":
        return config
    if not samples_per_epoch or samples_per_epoch < 1:
        raise ConfigError(
            f"schedule 'steps' needs samples_per_epoch >= 1, but found {samples_per_epoch!r}"
        )
    return config.replace(samples_per_volume=max(1, round(samples_per_epoch / n_subjects)))


def other_schedule_config(
    schedule: str, dispersed: TrainingConfig, n_dispersed: int, n_full: int
) -> TrainingConfig:
    """The full condition's settings under the schedule the chapter does not use.

    The dispersed Table 3 conditions train the same way under both schedules
    (:func:`condition_config`: ``epochs`` of ``samples_per_volume`` patches of each of their
    ``n_dispersed`` volumes); only the full condition differs: under equal epochs it takes
    their patches per volume (a third of their steps at dispersion 3), under equal steps as
    many patches per epoch as they do.

    Args:
        schedule: the chapter's schedule (the other one is returned).
        dispersed: a dispersed Table 3 condition's settings.
        n_dispersed: its training sessions.
        n_full: the full condition's training sessions.

    Raises:
        ConfigError: for an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, but found {schedule!r}")
    if schedule == "steps":  # the other one is the paper's: equal epochs
        return dispersed
    per_volume = max(1, round(dispersed.samples_per_volume * n_dispersed / n_full))
    return dispersed.replace(samples_per_volume=per_volume)


def condition_results(
    summary: pd.DataFrame, class_dice: pd.DataFrame, runs: pd.DataFrame
) -> pd.DataFrame:
    """One row per condition: the budget it spent, its training cost and its mean Dice.

    Args:
        summary: :func:`condition_summary` rows.
        class_dice: per-class Dice rows with ``condition``, ``set`` (``validation`` or
            ``test``), ``is_background`` and ``dice`` (one run per condition).
        runs: ``condition`` plus training facts (``steps``, ``train_time_s``, ...).

    Returns:
        ``summary`` joined with ``runs`` and ``val_dice``, ``val_dice_nobg``, ``test_dice``,
        ``test_dice_nobg``: means over the classes (all ten, or the eight tissues) of the
        per-class Dice.
    """
    means = {}
    for (condition, set_name), part in class_dice.groupby(["condition", "set"], sort=False):
        prefix = "val" if set_name == "validation" else set_name
        row = means.setdefault(condition, {"condition": condition})
        row[f"{prefix}_dice"] = part["dice"].mean()
        row[f"{prefix}_dice_nobg"] = part.loc[~part["is_background"], "dice"].mean()
    table = summary.merge(runs, on="condition", how="left")
    return table.merge(pd.DataFrame(list(means.values())), on="condition", how="left")


# --------------------------------------------------------------------------- findings


def other_schedule_condition(schedule: str) -> str:
    """Name of the fully labelled condition trained under the schedule the chapter does not use.

    ``fullepochs`` (equal epochs: the paper's Table 3 comparison) when the chapter's schedule
    is ``steps``; ``fullsteps`` when it is ``epochs``.

    Raises:
        ConfigError: for an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, but found {schedule!r}")
    other = next(name for name in SCHEDULES if name != schedule)
    return f"{FULL}{other}"


def full_conditions(schedule: str, both_schedules: bool) -> dict[str, str]:
    """The fully labelled condition trained under each schedule: ``{"steps": "full", ...}``."""
    names = {schedule: FULL}
    if both_schedules:
        other = next(name for name in SCHEDULES if name != schedule)
        names[other] = other_schedule_condition(schedule)
    return names


def paper_claims(dispersed: Sequence[str], full: Mapping[str, str]) -> list[Claim]:
    """The paper's conclusions on label budgeting (§4.2, Table 3) as claims, and neonb's.

    * paper: each dispersed condition (33 % of the slices of three times the subjects) beats
      full volumes at equal epochs ("performance was consistently higher when annotated
      slices were distributed over a larger number of scans, provided the number of training
      epochs was kept constant");
    * paper: sagittal, "the axis with the lowest resolution", is the worst dispersed
      condition (each other one beats it);
    * neonb: each dispersed condition beats full volumes at equal optimiser steps, where
      the dispersed conditions get no more training than full volumes.

    Args:
        dispersed: the dispersed Table 3 conditions trained (``random``, ``sagittal``, ...).
        full: the full condition trained under each schedule (:func:`full_conditions`); a
            schedule that was not trained gives no claims.
    """
    claims = []
    if "epochs" in full:
        claims += [
            Claim(f"{name} beats full volumes at equal epochs", name, full["epochs"], "greater")
            for name in dispersed
        ]
    if "sagittal" in dispersed:
        claims += [
            Claim(f"{name} beats sagittal", name, "sagittal", source="paper")
            for name in dispersed
            if name != "sagittal"
        ]
    if "steps" in full:
        claims += [
            Claim(f"{name} beats full volumes at equal steps", name, full["steps"], source="neonb")
            for name in dispersed
        ]
    return claims


def _paper_reference(claim: Claim) -> str:
    if claim.source != "paper":
        return "not in the paper"
    test = paper.table3()[("test", "Mean DSC (no BG)")]
    b = FULL if claim.b.startswith(FULL) else claim.b
    return f"test Dice (no BG) {claim.a} {test[claim.a]:.3f}, {b} {test[b]:.3f} (Table 3)"


def paper_findings(
    cases: pd.DataFrame,
    dispersed: Sequence[str],
    full: Mapping[str, str],
    value: str = "dice_mean_nobg",
    *,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """:func:`paper_claims` checked on per-subject test scores, each by its stated rule.

    Args:
        cases: one row per test subject, condition (and run), with ``condition``,
            ``participant_id`` and ``value``.
        dispersed, full: as :func:`paper_claims`.
        value: the per-subject score compared.
        alpha: family-wise error rate; the claims' p-values are Bonferroni-corrected together.

    Returns:
        :func:`neonb.statistics.check_claims` rows with a first column ``paper (dHCP)``
        (the paper's Table 3 test values, single runs without a test).
    """
    claims = paper_claims(dispersed, full)
    if not claims:
        raise ConfigError("no claim to check: train the dispersed conditions and full volumes")
    checked = check_claims(cases, value, claims, by="condition", alpha=alpha)
    checked.insert(0, "paper (dHCP)", [_paper_reference(c) for c in claims])
    return checked


# --------------------------------------------------------------------------- checks


def extent_lengths(extents: pd.DataFrame) -> pd.DataFrame:
    """Slices in the head's extent along each plane, one row per session of ``extents``.

    Args:
        extents: :func:`session_extents` rows (``<plane>_start``/``<plane>_stop`` columns).

    Returns:
        Columns ``sagittal``, ``coronal``, ``axial``: ``stop - start``.
    """
    return pd.DataFrame(
        {plane: extents[f"{plane}_stop"] - extents[f"{plane}_start"] for plane in PLANES}
    )


def evaluation_subset(records: Sequence[Mapping[str, Any]], n: int | None, *, seed: int) -> list:
    """A fixed, age-representative subset of ``n`` test sessions (``0``/``None``: all).

    Every condition is scored on the same subset (:func:`neonb.splits.stratified_pick` of
    the scan ages, seeded), which keeps scoring many models affordable.
    """
    ages = pd.Series({r["participant_id"]: r["scan_age"] for r in records}, dtype=float)
    count = len(ages) if n in (0, None) else min(int(n), len(ages))
    chosen = set(stratified_pick(ages, count, np.random.default_rng(seed)))
    return [dict(r) for r in records if r["participant_id"] in chosen]


def mask_follows_augmentation(
    record: Mapping[str, Any],
    mask_path: str | os.PathLike,
    config: TrainingConfig,
    *,
    draws: int = 10,
    seed: int = 0,
) -> list[bool]:
    """Whether an annotation mask still covers exactly its voxels after random augmentation.

    The mask replaces the record's label as well, and every augmentation
    (:meth:`neonb.transforms.AugmentationConfig.always`) is applied ``draws`` times with
    seeds ``seed``, ``seed + 1``, ...: since MONAI's dictionary transforms apply one draw to
    ``label`` and ``annotation`` alike, the two must come out identical, voxel for voxel.

    Returns:
        One bool per draw: label and annotation identical after it.
    """
    from neonb import transforms

    mask = np.asarray(nib.load(mask_path).dataobj, dtype=np.float32)
    as_label = {**record, "label": mask, "annotation": str(mask_path)}
    identical = []
    for draw in range(draws):
        _, after = transforms.augmented_example(
            as_label,
            config.patch_size,
            transforms.AugmentationConfig.always(),
            seed=seed + draw,
            model=config.model,
        )
        identical.append(bool(np.array_equal(after["label"], after["annotation"])))
    return identical


def gradient_probe(
    record: Mapping[str, Any], config: TrainingConfig, *, seed: int = 0
) -> pd.DataFrame:
    """Which logits of each deep-supervision head the masked loss sends gradient to.

    Takes one augmented training patch of ``record`` (with its ``annotation`` mask), runs a
    freshly initialised network of ``config.model`` in training mode, back-propagates
    :class:`neonb.losses.SegmentationLoss` and measures the gradient on the logits of every
    head. Trains nothing.

    Returns:
        One row per head (``final``, ``-1``, ...): the fraction of unannotated voxels in
        the patch, the largest gradient on an unannotated logit (0 when the mask works) and
        the fraction of annotated logits that receive a gradient.
    """
    import torch

    from neonb import transforms
    from neonb.losses import SegmentationLoss
    from neonb.models import build_model

    patch = transforms.train_transforms(config.patch_size, model=config.model)
    batch = patch.set_random_state(seed=seed)(dict(record))
    batch = {key: batch[key].as_tensor()[None] for key in ("image", "label", "annotation")}
    torch.manual_seed(seed)
    network = build_model(config.model).train()
    outputs = network(batch["image"])
    outputs.retain_grad()
    SegmentationLoss()(outputs, batch).backward()
    unannotated = (batch["annotation"] == 0).expand_as(outputs[:, 0])
    heads = range(outputs.shape[1])
    return pd.DataFrame(
        {
            "head": ["final" if h == 0 else f"-{h}" for h in heads],
            "unannotated voxels": float(unannotated.float().mean()),
            "gradient on unannotated logits": [
                float(outputs.grad[:, h][unannotated].abs().max()) for h in heads
            ],
            "logits with gradient, annotated": [
                float((outputs.grad[:, h][~unannotated] != 0).float().mean()) for h in heads
            ],
        }
    )
