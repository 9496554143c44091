"""Lay out a study before training anything: ``neonb study --plan``.

A paper-scale study is days of GPU time, so everything that can go wrong before the first
epoch should go wrong in seconds: the data root, the manifest, the split sizes, the label
budget. :func:`plan_study` resolves the data, draws (or reads back) the study's splits
exactly as chapter 00 does (:func:`neonb.splits.ensure_study_splits`), and for every chapter
with parameters lays out each set, condition and run it would make, without training:

- ``plan.tsv``: one row per chapter and set or condition (sessions, participants, youngest
  and oldest scan age in weeks, annotated slices where they apply);
- ``plan_runs.tsv``: one row per training run (its id, sessions, epochs, optimiser steps and,
  for the paper's network, an estimate of its T4 GPU hours). The runs are those the
  chapters train, as :mod:`neonb.runs` defines them, and the ids those of ``neonb train``;
- ``plan_chapters.tsv``: per chapter, the runs, the optimiser steps, an estimate of its peak
  host memory and of its T4 hours.

A chapter that cannot be planned (too few sessions for its sets, a label budget larger
than the pool, ...) is reported as one line naming the chapter and the reason.

Example:
    >>> plan = plan_study("params/paper", data_root="/data/dhcp_rel3")  # doctest: +SKIP
    >>> print(format_plan(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from neonb.errors import ConfigError, DataError, NeonbError
from neonb.files import atomic_write

PLAN_FILE = "plan.tsv"
RUNS_FILE = "plan_runs.tsv"
CHAPTERS_FILE = "plan_chapters.tsv"

PLAN_COLUMNS = [
    "chapter",
    "set",
    "sessions",
    "participants",
    "youngest",
    "oldest",
    "annotated_slices",
]
"""Columns of ``plan.tsv``; ages in weeks (postmenstrual age at scan)."""

RUN_COLUMNS = ["chapter", "run", "sessions", "epochs", "steps", "t4_hours"]
"""Columns of ``plan_runs.tsv``."""

CHAPTER_COLUMNS = ["chapter", "runs", "steps", "peak_host_gb", "t4_hours"]
"""Columns of ``plan_chapters.tsv``."""

PAPER_T4_HOURS_PER_RUN = 18.6
"""The paper's mean training time of one pipeline run (§4.1.1): 60 epochs on 114 volumes,
batch 2, validated every epoch, on an NVIDIA T4."""

PAPER_T4_SECONDS_PER_STEP = PAPER_T4_HOURS_PER_RUN * 3600 / (60 * math.ceil(114 / 2))
"""Derived from :data:`PAPER_T4_HOURS_PER_RUN`, validation included (about 19.6 s a step):
3,420 optimiser steps, counting one patch per volume and epoch as the authors' public code
draws (the paper does not state it). It holds for the paper's network and patch size only;
neonb has not measured a GPU step itself (no GPU was available to its development)."""

PAPER_NETWORK = {"patch_size": (128, 128, 128), "strides": (1, 2, 2, 2, 2, 2), "filters": None}
"""The settings whose step time :data:`PAPER_T4_SECONDS_PER_STEP` describes."""

# Peak host memory model (see :func:`estimate_peak_host_gb`).
PROCESS_HOST_GB = 2.0
"""Python, PyTorch, MONAI, the network, its optimiser and a CUDA context (our estimate)."""
LOADER_HOST_GB = 1.4
"""Peak of the paper configuration's training loader without workers, measured by
``benchmarks/bench_memory.py`` (flat in the number of sessions, thanks to the disk cache)."""
WORKER_GB_PER_PATCH_VOXEL = 0.7e9 / 128**3
"""A data-loading worker (two threads, :data:`neonb.engine.WORKER_THREADS`) drawing
augmented 128³ patches added 0.7 GB to the loader's peak (``benchmarks/bench_memory.py``,
4 workers); scaled by the patch's voxels for other patch sizes."""


@dataclass
class StudyPlan:
    """What :func:`plan_study` found.

    Attributes:
        sets: ``plan.tsv``, :data:`PLAN_COLUMNS`.
        runs: ``plan_runs.tsv``, :data:`RUN_COLUMNS`.
        chapters: ``plan_chapters.tsv``, :data:`CHAPTER_COLUMNS`.
        failures: one line per chapter that cannot be planned, ``"<chapter>: <reason>"``.
        notes: remarks (sessions left out, capped conditions, what an estimate assumes).
        folder: where the tables were written (the parameters' ``results_dir``).
    """

    sets: pd.DataFrame
    runs: pd.DataFrame
    chapters: pd.DataFrame
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether every chapter could be planned."""
        return not self.failures


def _age_row(chapter: str, name: str, sessions: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    return {
        "chapter": chapter,
        "set": name,
        "sessions": len(sessions),
        "participants": sessions["participant_id"].nunique(),
        "youngest": round(float(sessions["scan_age"].min()), 2) if len(sessions) else None,
        "oldest": round(float(sessions["scan_age"].max()), 2) if len(sessions) else None,
        "annotated_slices": extra.get("annotated_slices"),
    }


def _sets(table: pd.DataFrame, names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    return {name: table[table["split"] == name] for name in names}


def is_paper_network(config: Any) -> bool:
    """Whether ``config`` (a TrainingConfig) trains the paper's network on its patch size."""
    return (
        tuple(config.patch_size) == PAPER_NETWORK["patch_size"]
        and tuple(config.model.strides) == PAPER_NETWORK["strides"]
        and config.model.filters is None
    )


def _run(chapter: str, run: str, n_sessions: int, config: Any) -> dict[str, Any]:
    from neonb.experiment import optimizer_steps

    steps = optimizer_steps(n_sessions, config)
    hours = steps * PAPER_T4_SECONDS_PER_STEP / 3600 if is_paper_network(config) else None
    return {
        "chapter": chapter,
        "run": run,
        "sessions": n_sessions,
        "epochs": config.epochs,
        "steps": steps,
        "t4_hours": round(hours, 1) if hours is not None else None,
    }


def estimate_peak_host_gb(config: Any, volume_shape: tuple[int, ...], n_channels: int) -> float:
    """Estimated peak host memory (GB) of a chapter that trains with ``config``.

    With the disk cache (:mod:`neonb.cache`) no chapter holds its training set in memory.
    Training peaks with the process (:data:`PROCESS_HOST_GB`), the loader
    (:data:`LOADER_HOST_GB`) and each data-loading worker while it augments a patch
    (:data:`WORKER_GB_PER_PATCH_VOXEL`); testing, afterwards, with one whole volume scored
    by sliding windows (its input, the class probabilities and their accumulator, float32).

    Args:
        config: the chapter's :class:`neonb.experiment.TrainingConfig`.
        volume_shape: ``(X, Y, Z)`` of the cohort's images in voxels.
        n_channels: input channels (2: T1w and T2w).
    """
    patch = math.prod(config.patch_size)
    training = LOADER_HOST_GB + config.num_workers * WORKER_GB_PER_PATCH_VOXEL * patch / 1e9
    voxels = math.prod(volume_shape)
    testing = voxels * 4 * (n_channels + 2 * config.model.out_channels + 1) / 1e9
    return round(PROCESS_HOST_GB + max(training, testing), 1)


def _volume_shape(manifest: pd.DataFrame) -> tuple[int, ...]:
    complete = manifest[manifest["complete"].astype(bool)]
    if complete.empty:
        raise ConfigError("the data has no complete session")
    path = complete["t2w"].iloc[0]
    try:
        return tuple(int(n) for n in nib.load(path).shape[:3])
    except Exception as err:  # nibabel raises many kinds; the plan reports, never crashes
        raise DataError(path, f"cannot read the image header: {err}") from err


class _Planner:
    """Collects the rows of each chapter; one method per chapter."""

    def __init__(self, params: Mapping[str, Mapping[str, Any]], cohort, tables, shape):
        self.params = params
        self.cohort = cohort
        self.manifest = cohort.manifest
        self.tables = tables
        self.shape = shape
        self.sets: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.chapters: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def chapter(self, name: str, runs: list[dict[str, Any]], config: Any | None) -> None:
        self.runs += runs
        hours = [r["t4_hours"] for r in runs if r["t4_hours"] is not None]
        self.chapters.append(
            {
                "chapter": name,
                "runs": len(runs),
                "steps": sum(r["steps"] for r in runs),
                "peak_host_gb": (
                    estimate_peak_host_gb(config, self.shape, config.model.in_channels)
                    if config is not None
                    else None
                ),
                "t4_hours": round(sum(hours), 1) if hours else None,
            }
        )

    def data(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb.splits import complete_sessions, left_out

        self.sets.append(_age_row(name, "all sessions", self.manifest))
        self.sets.append(_age_row(name, "complete", complete_sessions(self.manifest)))
        for experiment, table in self.tables.items():
            gone = left_out(table).iloc[0]
            if gone["sessions_left_out"]:
                self.notes.append(
                    f"{experiment}: {int(gone['sessions_left_out'])} session(s) left out "
                    f"({gone['youngest']:.1f}-{gone['oldest']:.1f} weeks): their infant is in "
                    "the experiment with another session (split 'excluded' in "
                    f"splits_{experiment}.tsv)"
                )
        self.chapter(name, [], None)

    def define(self, name: str, p: Mapping[str, Any]):
        """The chapter's runs, as its notebook and ``neonb train`` define them."""
        from neonb.runs import define_runs

        pipeline = self.params.get("01_pipeline", {}).get("training", {})
        return define_runs(name, p, self.cohort, self.tables, pipeline_training=pipeline)

    def trained(self, name: str, chapter) -> None:
        """Add a row per run of ``chapter`` (:class:`neonb.runs.ChapterRuns`)."""
        runs = []
        for spec in chapter:
            run = _run(name, spec.id, spec.sessions, spec.config)
            if spec.head_only:
                # the head trains on cached bottleneck features: no U-Net step to time
                run["t4_hours"] = None
                run["steps"] = 0
            runs.append(run)
        self.chapter(name, runs, chapter.config)

    def pipeline(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb.splits import PIPELINE_SETS

        sets = _sets(self.tables["pipeline"], PIPELINE_SETS)
        self.sets += [_age_row(name, s, rows) for s, rows in sets.items()]
        self.trained(name, self.define(name, p))

    def ageunet(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb.splits import PIPELINE_SETS

        sets = _sets(self.tables["pipeline"], PIPELINE_SETS)
        self.sets += [_age_row(name, s, rows) for s, rows in sets.items()]
        chapter = self.define(name, p)
        self.trained(name, chapter)
        if any(run.head_only for run in chapter):
            self.notes.append(
                f"{name}: the staged variant's head trains on cached features (one forward "
                "pass of the baseline per volume); its GPU time is not estimated, nor counted "
                "in the chapter's t4_hours"
            )

    def budgeting(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb import budgeting
        from neonb.splits import PIPELINE_SETS

        chapter = self.define(name, p)
        plan, extents = chapter.plan, chapter.extents
        self.notes += [f"{name}: {note}" for note in plan.notes]
        counts = budgeting.annotated_slices(
            plan.conditions,
            plan.participants,
            extents,
            chapter.slices,
            full_plane=p.get("sweep_plane") or "axial",
        )
        by_id = {str(r["participant_id"]): r for r in chapter.pool_records}
        for condition in plan.conditions:
            ids = [str(i) for i in plan.participants[condition.name]]
            rows = pd.DataFrame(
                [{"participant_id": i, "scan_age": float(by_id[i]["scan_age"])} for i in ids],
                columns=["participant_id", "scan_age"],
            )
            self.sets.append(
                _age_row(name, condition.name, rows, annotated_slices=counts[condition.name])
            )
        held = _sets(self.tables["pipeline"], PIPELINE_SETS)
        self.sets += [_age_row(name, s, held[s]) for s in ("val", "test")]
        self.trained(name, chapter)

    def transfer(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb.splits import TRANSFER_SETS

        sets = _sets(self.tables["transfer"], TRANSFER_SETS)
        self.sets += [_age_row(name, s, rows) for s, rows in sets.items()]
        self.trained(name, self.define(name, p))

    def robustness(self, name: str, p: Mapping[str, Any]) -> None:
        from neonb.splits import PIPELINE_SETS

        sets = _sets(self.tables["pipeline"], PIPELINE_SETS)
        self.sets += [_age_row(name, s, rows) for s, rows in sets.items()]
        self.trained(name, self.define(name, p))

    def closing(self, name: str, p: Mapping[str, Any]) -> None:
        self.chapter(name, [], None)


CHAPTER_PLANNERS: dict[str, str] = {
    "00_data": "data",
    "01_pipeline": "pipeline",
    "02_ageunet": "ageunet",
    "03_budgeting": "budgeting",
    "04_transfer": "transfer",
    "06_robustness": "robustness",
    "05_paper_vs_neonb": "closing",
}
"""Which :class:`_Planner` method lays out each notebook."""


def plan_study(
    params_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    write: bool = True,
) -> StudyPlan:
    """Resolve the data, draw or read the splits, and lay out every chapter's runs.

    Nothing is trained. The splits are written (once) exactly as chapter 00 writes them.

    Args:
        params_dir: a parameters folder (``params/paper``).
        data_root: the dHCP release folder; overrides ``data_root`` of the parameters.
        write: write ``plan.tsv``, ``plan_runs.tsv`` and ``plan_chapters.tsv`` to the
            parameters' ``results_dir``.

    Returns:
        The plan; chapters that cannot be planned are in :attr:`StudyPlan.failures`.

    Raises:
        NeonbError: (as :class:`ConfigError` or :class:`DataError`) when nothing can be
            planned: no parameters, no data, or splits that cannot be drawn. The message
            starts with the chapter that needs them.
    """
    from neonb.splits import SplitSizes, ensure_study_splits
    from neonb.study import NOTEBOOKS, load_params, open_cohort_from_params

    params = {name: load_params(params_dir, name) for name in NOTEBOOKS}
    params = {name: p for name, p in params.items() if p is not None}
    if not params:
        raise ConfigError(f"{params_dir} holds no parameters for any of {list(NOTEBOOKS)}")
    study = next(iter(params.values()))
    first = next(iter(params))
    try:
        cohort = open_cohort_from_params(study, data_root=data_root)
        results = Path(study["results_dir"])
        tables = ensure_study_splits(results, cohort.manifest, SplitSizes.from_params(study))
        shape = _volume_shape(cohort.manifest)
    except NeonbError as err:
        raise ConfigError(f"{first}: {err}") from None
    planner = _Planner(params, cohort, tables, shape)
    failures = []
    for name, p in params.items():
        method: Callable[[str, Mapping[str, Any]], None] = getattr(planner, CHAPTER_PLANNERS[name])
        try:
            method(name, p)
        except (NeonbError, KeyError) as err:
            reason = f"the parameter {err} is missing" if isinstance(err, KeyError) else err
            failures.append(f"{name}: {reason}")
    planner.notes.append(
        "peak_host_gb is an estimate (neonb.plan.estimate_peak_host_gb: measured loader and "
        "worker peaks, the largest volume scored whole); t4_hours scales the paper's 18.6 h per "
        "pipeline run on a T4 (§4.1.1; 3,420 steps at one patch per volume and epoch, as the "
        "authors' code draws) by optimiser steps, for the paper's "
        "network only, and counts frozen-block fine-tuning as full steps (an upper bound)"
    )
    plan = StudyPlan(
        pd.DataFrame(planner.sets, columns=PLAN_COLUMNS).astype({"annotated_slices": "Int64"}),
        pd.DataFrame(planner.runs, columns=RUN_COLUMNS).astype({"t4_hours": float}),
        pd.DataFrame(planner.chapters, columns=CHAPTER_COLUMNS).astype(
            {"peak_host_gb": float, "t4_hours": float}
        ),
        failures,
        planner.notes,
        results if write else None,
    )
    if write:
        write_plan(plan, results)
    return plan


def check_plan(
    params_dir: str | os.PathLike, *, data_root: str | os.PathLike | None = None, echo=print
) -> StudyPlan:
    """:func:`plan_study`, printed; raises if a chapter cannot be planned.

    Raises:
        ConfigError: one line per chapter that cannot be planned, each naming the chapter.
    """
    plan = plan_study(params_dir, data_root=data_root)
    echo(format_plan(plan))
    if not plan.ok:
        raise ConfigError("; ".join(plan.failures))
    return plan


def write_plan(plan: StudyPlan, folder: str | os.PathLike) -> list[Path]:
    """Write the plan's three tables as TSV (missing values as ``n/a``), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for table, file in (
        (plan.sets, PLAN_FILE),
        (plan.runs, RUNS_FILE),
        (plan.chapters, CHAPTERS_FILE),
    ):
        written.append(
            atomic_write(
                folder / file,
                lambda tmp, t=table: t.to_csv(tmp, sep="\t", index=False, na_rep="n/a"),
            )
        )
    return written


def format_plan(plan: StudyPlan) -> str:
    """The plan as text for a terminal: the sets, the chapters, notes and failures."""
    lines = [
        plan.sets.to_string(index=False, na_rep=""),
        "",
        plan.chapters.to_string(index=False, na_rep="n/a"),
    ]
    lines += [""] + [f"note: {note}" for note in plan.notes] if plan.notes else []
    if plan.folder is not None:
        lines.append(f"plan written to {plan.folder / PLAN_FILE} (runs: {RUNS_FILE})")
    return "\n".join(lines)
