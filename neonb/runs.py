"""Every training run of the study, defined once: the notebooks, ``neonb train`` and the plan.

A chapter's runs depend on its parameters, the cohort and the study's splits. The functions
here turn those into :class:`Run` specs: a short id (``run-0``, ``staged``, ``sagittal``,
``deep``), the run folder, the resolved :class:`~neonb.experiment.TrainingConfig`, the
training sessions, the finished runs it starts from, and the call that trains it, which is
the call the chapter's notebook makes. A notebook trains its runs through these specs; so
does ``neonb train`` (:func:`train_chapter`), one process or many under ``torchrun``; and
``neonb study --plan`` (:mod:`neonb.plan`) counts their steps. A run trained by one is
found finished by the others (:func:`run_status`) and reloaded, never trained twice; a
partial one resumes from its checkpoint.

============== ========================================================= =====================
chapter        runs                                                      starts from
============== ========================================================= =====================
01_pipeline    ``run-0`` ... ``run-{n_runs-1}`` (seed + i)                nothing
02_ageunet     per variant (``paper``, ``standardized``, ``head_lr``,     01_pipeline ``run-0``
               ``alpha_ramp``, ``staged``): ``<variant>/run-0`` ...      (``init: baseline``;
               (seed + k)                                                always for staged)
03_budgeting   per condition (``full``, ``random``, ``sagittal``, ...):    nothing
               ``<condition>/run-0`` ... (seed + k)
04_transfer    ``source``; per strategy (``shallow``, ``medium``,          04_transfer ``source``
               ``deep``, ``full``, ``scratch``): ``<strategy>/run-0`` ...  (the fine-tuned four)
06_robustness  per model (``t2w``, ``randomized``): ``<model>/run-0`` ...  01_pipeline ``run-0``
                                                                         (``init: baseline``)
============== ========================================================= =====================

Example:
    >>> chapter = load_chapter("params/demo", "01_pipeline")  # doctest: +SKIP
    >>> [run.id for run in chapter]  # doctest: +SKIP
    ['run-0']
    >>> trained = chapter["run-0"].train()  # doctest: +SKIP

Replicates of a condition or strategy (``n_runs`` in the chapter's parameters) share its
data and differ in their seed; :meth:`ChapterRuns.groups` gathers them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import yaml

from neonb import distributed
from neonb.engine import BEST_MODEL_FILE, CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE
from neonb.errors import ConfigError, DataError
from neonb.experiment import TrainedRun, TrainingConfig
from neonb.files import atomic_write, exclusive_lock

FINISHED, PARTIAL, NOT_STARTED = "finished", "partial", "not started"
"""What :func:`run_status` says of a run folder."""

TRAINING_CHAPTERS = ("01_pipeline", "02_ageunet", "03_budgeting", "04_transfer", "06_robustness")
"""The chapters that train networks."""

BUDGET_DESIGN_KEYS = (
    "planes",
    "dispersion",
    "sweep_plane",
    "sweep_dispersions",
    "sweep_n_full",
    "one_slice",
    "placement",
    "margin",
)
"""Parameters of ``03_budgeting`` passed to :func:`neonb.budgeting.plan_budget`."""

Record = Mapping[str, Any]


def epochs_done(run_dir: str | os.PathLike) -> int:
    """Epochs in a run folder's ``log.tsv`` (0 without one)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as lines:
        return max(sum(1 for line in lines if line.strip()) - 1, 0)


def _config_epochs(run_dir: Path) -> int | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return int(values["epochs"]) if "epochs" in values else None


SPLITS_STAMP = "splits.sha256"
"""File in a run folder: the digest of the study's split tables the run was trained on."""


def splits_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of the study's split tables (:data:`neonb.splits.STUDY_SPLITS`) in ``folder``."""
    import hashlib

    from neonb.splits import STUDY_SPLITS

    digest = hashlib.sha256()
    for name, file in STUDY_SPLITS.items():
        path = Path(folder) / file
        try:
            content = path.read_bytes()
        except OSError as err:
            raise DataError(path, f"cannot be read: {err}") from err
        digest.update(f"{name}\n{len(content)}\n".encode())
        digest.update(content)
    return digest.hexdigest()


def check_splits_stamp(run_dir: str | os.PathLike, splits_dir: str | os.PathLike) -> None:
    """Refuse a run folder trained on other splits; stamp a new one with the current splits.

    A run reloaded as finished must have been trained on the splits the study evaluates it
    on, or test sessions could have been trained on. The first training of a run writes
    :data:`SPLITS_STAMP`; later calls compare it.

    Raises:
        DataError: naming the run folder when its stamp differs from the study's splits, or
            when it holds a started run without a stamp (trained by an older neonb).
    """
    run_dir = Path(run_dir)
    digest = splits_digest(splits_dir)
    stamp = run_dir / SPLITS_STAMP
    hint = "delete the run folder to train it on the study's current splits"
    if stamp.is_file():
        if stamp.read_text().strip() != digest:
            raise DataError(
                run_dir, f"was trained on other splits than those in {splits_dir}", hint=hint
            )
        return
    if any((run_dir / name).exists() for name in (CHECKPOINT_FILE, LOG_FILE)):
        raise DataError(
            run_dir, "was trained before neonb recorded the splits of each run", hint=hint
        )
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp, lambda tmp: tmp.write_text(digest + "\n"))


def run_status(run_dir: str | os.PathLike, epochs: int | None = None) -> str:
    """:data:`FINISHED`, :data:`PARTIAL` (resumable) or :data:`NOT_STARTED`.

    Finished: the best weights are there and ``log.tsv`` has all ``epochs`` (default: those
    of the folder's ``config.yaml``); :func:`neonb.engine.fit` writes the checkpoint before
    the log, so a complete log means a complete run. Partial: a checkpoint or some epochs.
    """
    run_dir = Path(run_dir)
    done = epochs_done(run_dir)
    total = epochs if epochs is not None else _config_epochs(run_dir)
    if total is not None and done >= total and (run_dir / BEST_MODEL_FILE).is_file():
        return FINISHED
    if done or (run_dir / CHECKPOINT_FILE).is_file():
        return PARTIAL
    return NOT_STARTED


class Need(NamedTuple):
    """A finished run another run starts from."""

    chapter: str
    run: str
    run_dir: Path

    def finished(self) -> bool:
        """Whether the run folder holds a finished run."""
        return run_status(self.run_dir) == FINISHED


@dataclass(frozen=True)
class Run:
    """One training run of a chapter, as its notebook trains it.

    Attributes:
        chapter: the chapter (``01_pipeline``).
        id: the run's short id within the chapter (``run-0``, ``staged``, ``sagittal``).
        run_dir: the run folder.
        config: the run's settings (``epochs`` counts its epochs; for a staged AgeU-Net, the
            head's epochs on cached features).
        sessions: training sessions.
        trainer: ``trainer(progress)`` trains, resumes or reloads the run.
        needs: finished runs this one starts from.
        head_only: trains the AgeU-Net head alone on cached features (no U-Net optimiser
            steps; one process: process 0 under torchrun).
        splits_dir: the results folder holding the study's split tables; the run folder is
            stamped with them (:func:`check_splits_stamp`). ``None``: no stamp.
        group: what the run is a replicate of (a condition, a strategy); ``""`` for none.
        replicate: the replicate's number within its group (seed ``seed + replicate``).
    """

    chapter: str
    id: str
    run_dir: Path
    config: TrainingConfig
    sessions: int
    trainer: Callable[[bool], TrainedRun] = field(repr=False, compare=False)
    needs: tuple[Need, ...] = ()
    head_only: bool = False
    splits_dir: Path | None = None
    group: str = ""
    replicate: int = 0

    def status(self) -> str:
        """:func:`run_status` of the run folder."""
        return run_status(self.run_dir, self.config.epochs)

    def unmet(self) -> list[Need]:
        """The runs this one starts from that have not finished."""
        return [need for need in self.needs if not need.finished()]

    def train(self, progress: bool = False) -> TrainedRun:
        """Train the run (resume a partial one; reload a finished one).

        Raises:
            ConfigError: naming the run it starts from, when that has not finished.
            DataError: when the run folder was trained on other splits
                (:func:`check_splits_stamp`).
        """
        unmet = self.unmet()
        if unmet:
            raise ConfigError(_unmet_message(self, unmet))
        if self.splits_dir is not None:
            check_splits_stamp(self.run_dir, self.splits_dir)
        return self.trainer(progress)


def _unmet_message(run: Run, unmet: Sequence[Need], params_dir: str | None = None) -> str:
    flag = f"--params {params_dir} " if params_dir else ""
    needs = "; ".join(
        f"{need.chapter} {need.run} ({need.run_dir}) has not finished: train it first "
        f"(neonb train {flag}--chapter {need.chapter} --run {need.run})"
        for need in unmet
    )
    return f"{run.chapter} {run.id} starts from another run: {needs}"


@dataclass
class ChapterRuns:
    """A chapter's runs, in the order its notebook trains them.

    Attributes:
        chapter: the chapter.
        runs: run id → :class:`Run`.
        records: the chapter's sessions as records, by set (``train``, ``val``, ``test``...).
        config: the chapter's base settings (before per-run changes).
        folder: the chapter's results folder.
    """

    chapter: str
    runs: dict[str, Run]
    records: dict[str, list[dict[str, Any]]]
    config: TrainingConfig
    folder: Path

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs.values())

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, run_id: str) -> Run:
        return self.select([run_id])[0]

    @property
    def ids(self) -> list[str]:
        """The run ids, in training order."""
        return list(self.runs)

    def select(self, run_ids: Sequence[str] | None = None) -> list[Run]:
        """The runs with these ids, in the chapter's order (all for ``None`` or empty).

        Raises:
            ConfigError: naming the unknown ids and the chapter's.
        """
        if not run_ids:
            return list(self.runs.values())
        unknown = [i for i in run_ids if i not in self.runs]
        if unknown:
            raise ConfigError(
                f"{self.chapter} has no run {', '.join(map(repr, unknown))}; its runs: "
                f"{', '.join(self.runs)}"
            )
        return [run for run in self.runs.values() if run.id in set(run_ids)]

    def groups(self) -> dict[str, list[Run]]:
        """The runs by group (condition or strategy), replicates in order."""
        grouped: dict[str, list[Run]] = {}
        for run in self:
            grouped.setdefault(run.group or run.id, []).append(run)
        return grouped

    def table(self) -> pd.DataFrame:
        """One row per run: id, status, epochs done/total, sessions, what it waits for, folder."""
        rows = []
        for run in self:
            waits = ", ".join(f"{n.chapter} {n.run}" for n in run.unmet())
            total = run.config.epochs
            rows.append(
                {
                    "run": run.id,
                    "status": run.status(),
                    "epochs": f"{min(epochs_done(run.run_dir), total)}/{total}",
                    "sessions": run.sessions,
                    "waits for": waits or "-",
                    "folder": str(run.run_dir),
                }
            )
        return pd.DataFrame(rows)


@dataclass
class AgeUNetRuns(ChapterRuns):
    """:class:`ChapterRuns` of ``02_ageunet``, with what the notebook shows besides.

    Attributes:
        baseline_dir: the pipeline's ``run-0``, whose settings the variants keep.
        head: the head's base settings.
        settings: run id → its ``(TrainingConfig, AgeHeadConfig)``.
        replicates: run id → ``(variant, k)``: the variant and the run's number (0 ..
            ``n_runs - 1``).
    """

    baseline_dir: Path = Path()
    head: Any = None
    settings: dict[str, tuple[TrainingConfig, Any]] = field(default_factory=dict)
    replicates: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass
class BudgetingRuns(ChapterRuns):
    """:class:`ChapterRuns` of ``03_budgeting``, with the budget the runs are drawn from.

    Attributes:
        pool_records: the sessions annotations may be spent on.
        pool_ages: their scan ages by participant.
        train_ids: the participants of the pipeline's training split.
        extents: the head's extent along each plane, per pooled session.
        plan: the conditions and their participants (:class:`neonb.budgeting.BudgetPlan`).
        slices: the annotated slices of every partial condition.
        masks_dir: where the annotation masks are written.
    """

    pool_records: list[dict[str, Any]] = field(default_factory=list)
    pool_ages: pd.Series | None = None
    train_ids: list[str] = field(default_factory=list)
    extents: pd.DataFrame | None = None
    plan: Any = None
    slices: pd.DataFrame | None = None
    masks_dir: Path = Path()


@dataclass
class TransferRuns(ChapterRuns):
    """:class:`ChapterRuns` of ``04_transfer``.

    Attributes:
        configs: ``source``, ``tune`` and ``scratch`` settings.
        depths: the levels each partial strategy trains (checked against the network).
    """

    configs: dict[str, TrainingConfig] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)


@dataclass
class RobustnessRuns(ChapterRuns):
    """:class:`ChapterRuns` of ``06_robustness``.

    Attributes:
        baseline_dir: the pipeline's ``run-0``: the paper's T1w+T2w network, which the
            chapter compares with its own runs (and, with ``init: baseline``, their start).
        models: model name → its changes to the baseline's settings (``channels``,
            ``synthesis``, ...).
    """

    baseline_dir: Path = Path()
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


# --------------------------------------------------------------------------- replicates


@dataclass
class TrainedRuns:
    """Finished runs of a chapter, with what the chapters report of them.

    Attributes:
        runs: the run specs, by id, in training order.
        trained: the finished runs, by id.
    """

    runs: dict[str, Run]
    trained: dict[str, TrainedRun]

    def _name(self, run: Run, names: Mapping[str, str]) -> str:
        group = run.group or run.id
        return names.get(group, group)

    def facts(self, by: str = "group", names: Mapping[str, str] | None = None) -> pd.DataFrame:
        """One row per run: ``by`` (its group), ``run`` (replicate), ``sessions``, ``epochs``
        (done), ``samples_per_volume``, ``steps``, ``train_time_s``, ``s_per_step``,
        ``best_epoch`` and ``val_dice_nobg`` (at the best epoch).

        Args:
            by: the name of the group column (``condition``, ``strategy``).
            names: renames groups (``{"source": "none"}``).
        """
        from neonb.experiment import optimizer_steps

        names = names or {}
        rows = []
        for run_id, trained in self.trained.items():
            run = self.runs[run_id]
            epochs = len(trained.log)
            steps = optimizer_steps(run.sessions, run.config.replace(epochs=epochs))
            rows.append(
                {
                    by: self._name(run, names),
                    "run": run.replicate,
                    "sessions": run.sessions,
                    "epochs": epochs,
                    "samples_per_volume": run.config.samples_per_volume,
                    "steps": steps,
                    "train_time_s": trained.train_time_s,
                    "s_per_step": trained.train_time_s / max(steps, 1),
                    "best_epoch": int(trained.best["epoch"]),
                    "val_dice_nobg": float(trained.best["val_dice_nobg"]),
                }
            )
        return pd.DataFrame(rows)

    def logs(self, by: str = "group", names: Mapping[str, str] | None = None) -> pd.DataFrame:
        """Every run's epoch log, with its group (column ``by``) and replicate (``run``)."""
        names = names or {}
        return pd.concat(
            [
                trained.log.assign(
                    **{by: self._name(self.runs[i], names), "run": self.runs[i].replicate}
                )
                for i, trained in self.trained.items()
            ],
            ignore_index=True,
        )

    def evaluate(
        self,
        volumes: Sequence[Mapping[str, Any]],
        config: TrainingConfig,
        *,
        by: str = "group",
        names: Mapping[str, str] | None = None,
        sw_batch_size: int = 8,
        backend: str = "torch",
    ) -> pd.DataFrame:
        """Per-class test Dice of every run (:func:`neonb.experiment.evaluate`).

        Args:
            volumes: the test volumes (:func:`neonb.experiment.prepare_volumes`), loaded once
                for every run.
            config: the window size, overlap and device of the segmentation.
            by, names: as :meth:`facts`.
            sw_batch_size: windows per forward pass.
            backend: what runs the windows (:data:`neonb.inference.BACKENDS`); each run's
                network is compiled once for all ``volumes``.

        Returns:
            The per-class rows of :func:`~neonb.experiment.evaluate` (Dice, no HD95) with
            ``by`` and ``run`` columns.
        """
        from neonb.experiment import evaluate

        names = names or {}
        tables = []
        for run_id, trained in self.trained.items():
            run = self.runs[run_id]
            scores = evaluate(
                trained.model, volumes, config, sw_batch_size=sw_batch_size, backend=backend
            )
            tables.append(
                scores.per_class.assign(**{by: self._name(run, names), "run": run.replicate})
            )
        return pd.concat(tables, ignore_index=True)


def train_runs(
    runs: Iterable[Run], *, progress: bool = False, say: Callable[[str], Any] | None = print
) -> TrainedRuns:
    """Train (or reload) runs in order, saying one line per run.

    Args:
        runs: run specs, e.g. a :class:`ChapterRuns` or some of its runs.
        progress: progress bars while training.
        say: where the one-line summaries go (``None``: nowhere).
    """
    specs, trained = {}, {}
    for run in runs:
        started = time.perf_counter()
        specs[run.id], trained[run.id] = run, run.train(progress=progress)
        if say is not None:
            best = trained[run.id].best
            say(
                f"{run.id:>20}: {len(trained[run.id].log)} epochs, "
                f"{trained[run.id].train_time_s:.0f} s of training "
                f"({time.perf_counter() - started:.0f} s now); best validation Dice (no BG) "
                f"{best['val_dice_nobg']:.3f} at epoch {int(best['epoch'])}"
            )
    return TrainedRuns(specs, trained)


# --------------------------------------------------------------------------- trainers


def _train_segmentation(
    train: Sequence[Record],
    val: Sequence[Record],
    config: TrainingConfig,
    run_dir: Path,
    progress: bool,
) -> TrainedRun:
    from neonb.experiment import train_segmentation

    return train_segmentation(train, val, config, run_dir, progress=progress)


def _train_ageunet(
    train: Sequence[Record],
    val: Sequence[Record],
    config: TrainingConfig,
    head: Any,
    run_dir: Path,
    init_weights: Path | None,
    progress: bool,
) -> TrainedRun:
    from neonb.ageunet import train_ageunet

    return train_ageunet(
        train, val, config, head, run_dir, init_weights=init_weights, progress=progress
    )


def _train_from_baseline(
    train: Sequence[Record],
    val: Sequence[Record],
    config: TrainingConfig,
    run_dir: Path,
    init_weights: Path | None,
    baseline_channels: Sequence[str],
    progress: bool,
) -> TrainedRun:
    from neonb.experiment import train_segmentation
    from neonb.inference import load_weights
    from neonb.models import build_model

    model = None
    if init_weights is not None:
        model = load_weights(
            build_model(config.model), init_weights, channels=(baseline_channels, config.channels)
        )
    return train_segmentation(train, val, config, run_dir, model=model, progress=progress)


def _mask_rows(slices: pd.DataFrame, masks_dir: Path) -> pd.DataFrame:
    """The mask of each (condition, session) of ``slices``: the path write_masks writes."""
    from neonb.budgeting import mask_filename

    keys = slices[["condition", "participant_id", "session_id"]].drop_duplicates()
    return keys.assign(
        mask=[
            str(masks_dir / mask_filename(p, s, c))
            for c, p, s in keys.itertuples(index=False, name=None)
        ]
    )


def _train_condition(
    pool: Sequence[Record],
    participants: Sequence[str],
    condition: Any,
    slices: pd.DataFrame,
    masks_dir: Path,
    val: Sequence[Record],
    config: TrainingConfig,
    run_dir: Path,
    progress: bool,
) -> TrainedRun:
    from neonb import budgeting
    from neonb.experiment import train_segmentation

    masks = None
    if not condition.is_full:
        mine = slices[slices["condition"] == condition.name]
        if run_status(run_dir, config.epochs) != FINISHED:  # a finished run needs no masks
            if distributed.is_main():
                budgeting.write_masks(mine, pool, masks_dir)
            distributed.barrier()
        masks = _mask_rows(mine, masks_dir)
    records = budgeting.condition_records(pool, participants, masks, condition.name)
    return train_segmentation(records, val, config, run_dir, progress=progress)


def _fine_tune(
    source_dir: Path,
    strategy: str,
    train: Sequence[Record],
    val: Sequence[Record],
    config: TrainingConfig,
    run_dir: Path,
    depths: Mapping[str, int],
    progress: bool,
) -> TrainedRun:
    from neonb.experiment import load_trained_run
    from neonb.transfer import fine_tune

    source, _ = load_trained_run(source_dir)
    return fine_tune(
        source.model, strategy, train, val, config, run_dir, depths=depths, progress=progress
    )


# --------------------------------------------------------------------------- chapters


def _records(cohort: Any, table: pd.DataFrame, names: Sequence[str]) -> dict[str, list[dict]]:
    from neonb.splits import select

    return {name: cohort.records(select(cohort.manifest, table, name)) for name in names}


def pipeline_runs(
    cohort: Any,
    pipeline_splits: pd.DataFrame,
    *,
    results_dir: str | os.PathLike,
    seed: int,
    training: Mapping[str, Any],
    n_runs: int = 1,
) -> ChapterRuns:
    """The pipeline chapter's runs: ``run-i`` trains with seed ``seed + i``.

    Args:
        cohort: the study's cohort (:func:`neonb.study.open_cohort`).
        pipeline_splits: the study's pipeline splits (``splits_pipeline.tsv``).
        results_dir: the study's results folder; runs go to ``01_pipeline/run-i``.
        seed: the study's seed.
        training: the chapter's ``training`` parameters.
        n_runs: runs (the paper: 4).

    Raises:
        ConfigError: for ``n_runs`` that is not a whole number of at least 1.
    """
    n_runs = _check_n_runs(n_runs)
    folder = Path(results_dir) / "01_pipeline"
    config = TrainingConfig.from_dict({**training, "seed": seed})
    records = _records(cohort, pipeline_splits, ("train", "val", "test"))
    runs = {}
    for i in range(n_runs):
        run_config, run_dir = config.replace(seed=seed + i), folder / f"run-{i}"
        trainer = functools.partial(
            _train_segmentation, records["train"], records["val"], run_config, run_dir
        )
        runs[f"run-{i}"] = Run(
            "01_pipeline",
            f"run-{i}",
            run_dir,
            run_config,
            len(records["train"]),
            trainer,
            splits_dir=Path(results_dir),
        )
    return ChapterRuns("01_pipeline", runs, records, config, folder)


def _baseline_config(
    baseline_dir: Path, baseline_training: Mapping[str, Any] | None, seed: int
) -> TrainingConfig:
    """The pipeline baseline's settings: its ``config.yaml`` once finished, else (planning)
    the pipeline chapter's ``training`` parameters; ``None`` for those: it must have finished.

    Raises:
        DataError: when it must have finished and has not.
    """
    from neonb.experiment import read_finished_run

    if baseline_training is None or run_status(baseline_dir) == FINISHED:
        return read_finished_run(baseline_dir)[0]
    return TrainingConfig.from_dict({**baseline_training, "seed": seed})


def ageunet_runs(
    cohort: Any,
    pipeline_splits: pd.DataFrame,
    *,
    results_dir: str | os.PathLike,
    seed: int,
    training: Mapping[str, Any],
    head: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    init: str = "baseline",
    baseline_training: Mapping[str, Any] | None = None,
    n_runs: int = 1,
) -> AgeUNetRuns:
    """The AgeU-Net chapter's runs: ``n_runs`` per variant.

    Every variant keeps the settings of the pipeline's ``run-0`` (its ``config.yaml``),
    changed by ``training`` and then by the variant's own ``training``; its head is
    ``head`` changed by the variant's ``head``. With ``init="baseline"`` (and always for the
    staged variant) a run starts from the baseline's weights, which must have finished.
    Run ``k`` of a variant trains with seed ``seed + k`` in the folder
    :func:`replicate_id` names: ``<variant>/run-<k>``.

    Args:
        cohort, pipeline_splits, results_dir, seed: as :func:`pipeline_runs`.
        training: changes to the baseline's settings (the paper: learning rate 1e-3).
        head: :class:`neonb.ageunet.AgeHeadConfig` values.
        variants: name → ``{"training": ..., "head": ...}`` changes.
        init: ``"baseline"`` or ``"scratch"``.
        baseline_training: the pipeline chapter's ``training`` parameters, for the
            baseline's settings while it has not finished (planning, ``neonb train --list``);
            ``None``: the baseline must have finished.
        n_runs: runs per variant (the paper: 2).

    Raises:
        DataError: when the baseline has not finished and no ``baseline_training`` is given.
        ConfigError: for an unknown ``init``, ``n_runs`` below 1, or a variant name that
            another variant's replicate would take.
    """
    from neonb.ageunet import AgeHeadConfig

    if init not in ("baseline", "scratch"):
        raise ConfigError(f"init must be 'baseline' or 'scratch', but found {init!r}")
    n_runs = _check_n_runs(n_runs)
    results = Path(results_dir)
    folder, baseline_dir = results / "02_ageunet", results / "01_pipeline" / "run-0"
    base = _baseline_config(baseline_dir, baseline_training, seed)
    config = base.replace(**training)
    head_config = AgeHeadConfig.from_dict(head)
    records = _records(cohort, pipeline_splits, ("train", "val", "test"))
    baseline = Need("01_pipeline", "run-0", baseline_dir)
    runs, settings, replicates = {}, {}, {}
    for name, variant in variants.items():
        variant_config = config.replace(**variant.get("training", {}))
        run_head = head_config.replace(**variant.get("head", {}))
        start = init == "baseline" or run_head.staged
        weights = baseline_dir / BEST_MODEL_FILE if start else None
        for k in range(n_runs):
            run_id = replicate_id(name, k)
            run_config = variant_config.replace(seed=variant_config.seed + k)
            settings[run_id], replicates[run_id] = (run_config, run_head), (name, k)
            trainer = functools.partial(
                _train_ageunet,
                records["train"],
                records["val"],
                run_config,
                run_head,
                folder / run_id,
                weights,
            )
            runs[run_id] = Run(
                "02_ageunet",
                run_id,
                folder / run_id,
                run_config,
                len(records["train"]),
                trainer,
                needs=(baseline,) if start else (),
                head_only=bool(run_head.staged),
                splits_dir=Path(results_dir),
                group=name,
                replicate=k,
            )
    return AgeUNetRuns(
        "02_ageunet",
        runs,
        records,
        config,
        folder,
        baseline_dir=baseline_dir,
        head=head_config,
        settings=settings,
        replicates=replicates,
    )


def replicate_id(group: str, replicate: int) -> str:
    """The id of a replicate run, as its folder below the chapter's: ``sagittal/run-1``."""
    return f"{group}/run-{replicate}"


def budgeting_runs(
    cohort: Any,
    pipeline_splits: pd.DataFrame,
    *,
    results_dir: str | os.PathLike,
    seed: int,
    training: Mapping[str, Any],
    n_full: int,
    schedule: str = "epochs",
    samples_per_epoch: int | None = None,
    both_schedules: bool = False,
    n_runs: int = 1,
    **design: Any,
) -> BudgetingRuns:
    """The label-budgeting chapter's runs: ``n_runs`` replicates per condition, from scratch.

    Reads (or computes and caches) the extents of the pooled sessions
    (:func:`neonb.budgeting.cached_extents`), draws the conditions
    (:func:`neonb.budgeting.plan_budget`) and their slices
    (:func:`neonb.budgeting.slice_table`); a condition's annotation masks are written when
    it trains (:func:`neonb.budgeting.write_masks`). Replicate ``k`` of a condition
    (:func:`replicate_id`, folder ``runs/<condition>/run-<k>``) trains with seed ``seed + k``
    on the same participants and slices: replicates measure what training's randomness
    (initialisation, patches, augmentation) does, not what another draw of slices would.

    Args:
        cohort, pipeline_splits, results_dir, seed: as :func:`pipeline_runs`.
        training: the chapter's ``training`` parameters.
        n_full: fully labelled sessions.
        schedule, samples_per_epoch: :func:`neonb.budgeting.condition_config`.
        both_schedules: also train the fully labelled condition under the other schedule
            (:func:`neonb.budgeting.other_schedule_condition`), so that Table 3 can be read
            at equal epochs (the paper's comparison) and at equal optimiser steps.
        n_runs: replicates per condition.
        **design: more :func:`neonb.budgeting.plan_budget` arguments
            (:data:`BUDGET_DESIGN_KEYS`).

    Raises:
        ConfigError: for ``n_runs`` below 1.
    """
    from neonb import budgeting

    n_runs = _check_n_runs(n_runs)
    folder = Path(results_dir) / "03_budgeting"
    pool, ages, train_ids = budgeting.budget_pool(
        cohort.manifest, pipeline_splits, brain_mask=cohort.brain_mask
    )
    records = _records(cohort, pipeline_splits, ("val", "test"))
    folder.mkdir(parents=True, exist_ok=True)
    extents = budgeting.cached_extents(pool, folder / "extents.tsv")
    plan = budgeting.plan_budget(ages, train_ids, extents, n_full=n_full, **design, seed=seed)
    slices = budgeting.slice_table(plan.conditions, plan.sessions(pool), extents, seed=seed)
    config = TrainingConfig.from_dict({**training, "seed": seed})
    masks_dir = folder / "masks"
    trained: list[tuple[Any, list[str], TrainingConfig]] = []
    for condition in plan.conditions:
        ids = [str(i) for i in plan.participants[condition.name]]
        run_config = budgeting.condition_config(
            config, len(ids), schedule=schedule, samples_per_epoch=samples_per_epoch
        )
        trained.append((condition, ids, run_config))
    if both_schedules:
        full = next(c for c in plan.conditions if c.is_full and c.name in plan.table3)
        dispersed = next(t for t in trained if t[0].name in plan.table3 and not t[0].is_full)
        extra = dataclasses.replace(full, name=budgeting.other_schedule_condition(schedule))
        extra_config = budgeting.other_schedule_config(
            schedule, dispersed[2], dispersed[0].n_subjects, full.n_subjects
        )
        trained.append((extra, [str(i) for i in plan.participants[full.name]], extra_config))
    runs = {}
    for condition, ids, run_config in trained:
        for k in range(n_runs):
            run_id = replicate_id(condition.name, k)
            replicate_config = run_config.replace(seed=seed + k)
            run_dir = folder / "runs" / run_id
            trainer = functools.partial(
                _train_condition,
                pool,
                ids,
                condition,
                slices,
                masks_dir,
                records["val"],
                replicate_config,
                run_dir,
            )
            runs[run_id] = Run(
                "03_budgeting",
                run_id,
                run_dir,
                replicate_config,
                len(ids),
                trainer,
                splits_dir=Path(results_dir),
                group=condition.name,
                replicate=k,
            )
    return BudgetingRuns(
        "03_budgeting",
        runs,
        records,
        config,
        folder,
        pool_records=pool,
        pool_ages=ages,
        train_ids=train_ids,
        extents=extents,
        plan=plan,
        slices=slices,
        masks_dir=masks_dir,
    )


def _changed(config: TrainingConfig, changes: Mapping[str, Any]) -> TrainingConfig:
    """``config`` with ``changes``; with new ``channels`` the network's input channels are
    left for :meth:`TrainingConfig.from_dict` to derive from them."""
    values = {**config.to_dict(), **changes}
    if "channels" in changes:
        values["model"] = {k: v for k, v in values["model"].items() if k != "in_channels"}
    return TrainingConfig.from_dict(values)


def robustness_runs(
    cohort: Any,
    pipeline_splits: pd.DataFrame,
    *,
    results_dir: str | os.PathLike,
    seed: int,
    training: Mapping[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    init: str = "baseline",
    baseline_training: Mapping[str, Any] | None = None,
    n_runs: int = 1,
) -> RobustnessRuns:
    """The robustness chapter's runs: ``n_runs`` per model, on the pipeline's sessions.

    Every model keeps the settings of the pipeline's ``run-0`` (the paper's T1w+T2w
    network, which the chapter compares them with), changed by ``training`` and then by
    the model's own changes, e.g. ``{"channels": ["t2w"]}`` or ``{"channels": ["t2w"],
    "synthesis": {...}}`` (:class:`neonb.experiment.TrainingConfig`). With
    ``init="baseline"`` a run starts from the baseline's weights (the filters of the
    channels it keeps), which must have finished. Run ``k`` of a model trains with seed
    ``seed + k`` in ``06_robustness/<model>/run-<k>``.

    Args:
        cohort, pipeline_splits, results_dir, seed: as :func:`pipeline_runs`.
        training: changes to the baseline's settings for every model.
        models: model name → its changes.
        init: ``"baseline"`` or ``"scratch"``.
        baseline_training: the pipeline chapter's ``training`` parameters, for the
            baseline's settings while it has not finished (planning); ``None``: it must
            have finished.
        n_runs: runs per model.

    Raises:
        DataError: when the baseline has not finished and no ``baseline_training`` is given.
        ConfigError: for an unknown ``init``, ``n_runs`` below 1, no model, or a bad setting.
    """

    if init not in ("baseline", "scratch"):
        raise ConfigError(f"init must be 'baseline' or 'scratch', but found {init!r}")
    if not models:
        raise ConfigError("06_robustness: models names no model to train")
    n_runs = _check_n_runs(n_runs)
    results = Path(results_dir)
    folder, baseline_dir = results / "06_robustness", results / "01_pipeline" / "run-0"
    base = _baseline_config(baseline_dir, baseline_training, seed)
    config = _changed(base, training)
    records = _records(cohort, pipeline_splits, ("train", "val", "test"))
    baseline = Need("01_pipeline", "run-0", baseline_dir)
    weights = baseline_dir / BEST_MODEL_FILE if init == "baseline" else None
    runs = {}
    for name, changes in models.items():
        model_config = _changed(config, changes or {})
        for k in range(n_runs):
            run_id = replicate_id(name, k)
            run_config = model_config.replace(seed=model_config.seed + k)
            trainer = functools.partial(
                _train_from_baseline,
                records["train"],
                records["val"],
                run_config,
                folder / run_id,
                weights,
                base.channels,
            )
            runs[run_id] = Run(
                "06_robustness",
                run_id,
                folder / run_id,
                run_config,
                len(records["train"]),
                trainer,
                needs=(baseline,) if weights is not None else (),
                splits_dir=results,
                group=name,
                replicate=k,
            )
    return RobustnessRuns(
        "06_robustness",
        runs,
        records,
        config,
        folder,
        baseline_dir=baseline_dir,
        models={name: dict(changes or {}) for name, changes in models.items()},
    )


def _check_n_runs(n_runs: Any) -> int:
    """``n_runs`` as an int, or a :class:`ConfigError` for anything but a whole number >= 1."""
    if not isinstance(n_runs, numbers.Integral) or isinstance(n_runs, bool) or n_runs < 1:
        raise ConfigError(f"n_runs must be a whole number of at least 1, but found {n_runs!r}")
    return int(n_runs)


def transfer_runs(
    cohort: Any,
    transfer_splits: pd.DataFrame,
    *,
    results_dir: str | os.PathLike,
    seed: int,
    training: Mapping[str, Any],
    fine_tuning: Mapping[str, Any],
    scratch: Mapping[str, Any],
    depths: Mapping[str, int] | None = None,
    n_runs: int = 1,
) -> TransferRuns:
    """The transfer chapter's runs: ``source``, then the fine-tuned strategies and ``scratch``.

    The four fine-tuned strategies (:data:`neonb.transfer.FINE_TUNED`) start from the best
    epoch of ``source``; every target run is validated on its training sessions. Each
    strategy and ``scratch`` has ``n_runs`` replicates (:func:`replicate_id`, e.g.
    ``deep/run-1``, seed ``seed + k``); all fine-tune the one source network, so replicates
    measure the randomness of fine-tuning (and of scratch training), not of pre-training.

    Args:
        cohort, results_dir, seed: as :func:`pipeline_runs`.
        transfer_splits: the study's transfer splits (``splits_transfer.tsv``).
        training: the source network's settings.
        fine_tuning: changes to ``training`` when fine-tuning.
        scratch: changes to ``training`` for the network trained on the target alone.
        depths: levels trained by ``shallow``, ``medium`` and ``deep`` (default the paper's).
        n_runs: replicates of each target run.

    Raises:
        ConfigError: when ``depths`` do not fit the network, or ``n_runs`` is below 1.
    """
    from neonb import models, transfer

    n_runs = _check_n_runs(n_runs)
    folder = Path(results_dir) / "04_transfer"
    configs = {
        "source": TrainingConfig.from_dict({**training, "seed": seed}),
        "tune": TrainingConfig.from_dict({**training, **fine_tuning, "seed": seed}),
        "scratch": TrainingConfig.from_dict({**training, **scratch, "seed": seed}),
    }
    depths = transfer.check_depths(
        transfer.PAPER_DEPTHS if depths is None else depths,
        models.build_model(configs["source"].model),
    )
    names = ("source_train", "source_val", "target_train", "target_test")
    records = _records(cohort, transfer_splits, names)
    source_dir = folder / "source"
    source = Need("04_transfer", "source", source_dir)
    target = records["target_train"]

    def run(name: str, config: TrainingConfig, trainer, sessions: int, needs=(), k: int = 0) -> Run:
        return Run(
            "04_transfer",
            name,
            folder / name,
            config,
            sessions,
            trainer,
            needs,
            splits_dir=Path(results_dir),
            group=name.split("/")[0],
            replicate=k,
        )

    runs = {
        "source": run(
            "source",
            configs["source"],
            functools.partial(
                _train_segmentation,
                records["source_train"],
                records["source_val"],
                configs["source"],
                source_dir,
            ),
            len(records["source_train"]),
        )
    }
    for strategy in [*transfer.FINE_TUNED, "scratch"]:
        for k in range(n_runs):
            run_id = replicate_id(strategy, k)
            if strategy == "scratch":
                config = configs["scratch"].replace(seed=seed + k)
                trainer = functools.partial(
                    _train_segmentation, target, target, config, folder / run_id
                )
                runs[run_id] = run(run_id, config, trainer, len(target), k=k)
                continue
            config = configs["tune"].replace(seed=seed + k)
            trainer = functools.partial(
                _fine_tune, source_dir, strategy, target, target, config, folder / run_id, depths
            )
            runs[run_id] = run(run_id, config, trainer, len(target), (source,), k=k)
    return TransferRuns(
        "04_transfer", runs, records, configs["source"], folder, configs=configs, depths=depths
    )


def define_runs(
    chapter: str,
    params: Mapping[str, Any],
    cohort: Any,
    tables: Mapping[str, pd.DataFrame],
    *,
    pipeline_training: Mapping[str, Any] | None = None,
) -> ChapterRuns:
    """A chapter's runs from its parameters (:func:`neonb.study.load_params`).

    Args:
        chapter: one of :data:`TRAINING_CHAPTERS`.
        params: the chapter's parameters.
        cohort: the study's cohort.
        tables: the study's splits (:func:`neonb.splits.load_study_splits`).
        pipeline_training: ``01_pipeline``'s ``training`` parameters, for ``02_ageunet``
            while the baseline has not finished.

    Raises:
        ConfigError: for a chapter that trains nothing.
        KeyError: for a missing parameter.
    """
    common = {
        "results_dir": params["results_dir"],
        "seed": params["seed"],
        "training": params.get("training", {}),
    }
    if chapter == "01_pipeline":
        return pipeline_runs(cohort, tables["pipeline"], **common, n_runs=params.get("n_runs", 1))
    if chapter == "02_ageunet":
        return ageunet_runs(
            cohort,
            tables["pipeline"],
            **common,
            head=params.get("head", {}),
            variants=params.get("variants", {}),
            init=params.get("init", "baseline"),
            baseline_training=pipeline_training,
            n_runs=params.get("n_runs", 1),
        )
    if chapter == "03_budgeting":
        return budgeting_runs(
            cohort,
            tables["pipeline"],
            **common,
            n_full=params["n_full"],
            schedule=params.get("schedule", "epochs"),
            samples_per_epoch=params.get("samples_per_epoch"),
            both_schedules=bool(params.get("both_schedules", False)),
            n_runs=params.get("n_runs", 1),
            **{key: params[key] for key in BUDGET_DESIGN_KEYS if key in params},
        )
    if chapter == "04_transfer":
        return transfer_runs(
            cohort,
            tables["transfer"],
            **common,
            fine_tuning=params.get("fine_tuning", {}),
            scratch=params.get("scratch", {}),
            depths=params.get("depths"),
            n_runs=params.get("n_runs", 1),
        )
    if chapter == "06_robustness":
        return robustness_runs(
            cohort,
            tables["pipeline"],
            **common,
            models=params.get("models", {}),
            init=params.get("init", "baseline"),
            baseline_training=pipeline_training,
            n_runs=params.get("n_runs", 1),
        )
    raise ConfigError(
        f"chapter {chapter!r} trains no networks; the chapters that do: "
        f"{', '.join(TRAINING_CHAPTERS)}"
    )


def _chapter_name(chapter: str) -> str:
    """``01_pipeline`` for ``01_pipeline`` or ``pipeline``."""
    for name in TRAINING_CHAPTERS:
        if chapter in (name, name.split("_", 1)[1]):
            return name
    raise ConfigError(
        f"no chapter {chapter!r} trains networks; choose one of {', '.join(TRAINING_CHAPTERS)}"
    )


def load_chapter(
    params_dir: str | os.PathLike, chapter: str, *, data_root: str | os.PathLike | None = None
) -> ChapterRuns:
    """Read a chapter's parameters, open the cohort, read (or draw) the splits, define its runs.

    The splits are those of the plan and chapter 00 (drawn once, then read back:
    :func:`neonb.splits.ensure_study_splits`).

    Args:
        params_dir: a parameters folder (``params/paper``).
        chapter: ``01_pipeline`` (or ``pipeline``), ``02_ageunet``, ``03_budgeting``,
            ``04_transfer`` or ``06_robustness``.
        data_root: the dHCP release; overrides the parameters' ``data_root``.

    Raises:
        ConfigError: for an unknown chapter, or one the parameters folder does not run.
    """
    from neonb.splits import SplitSizes, ensure_study_splits
    from neonb.study import load_params, open_cohort_from_params

    chapter = _chapter_name(chapter)
    params = load_params(params_dir, chapter)
    if params is None:
        raise ConfigError(f"{params_dir} has no {chapter}.yaml: this scale does not run {chapter}")
    pipeline = load_params(params_dir, "01_pipeline") or {}
    cohort = open_cohort_from_params(params, data_root=data_root)
    tables = ensure_study_splits(
        Path(params["results_dir"]), cohort.manifest, SplitSizes.from_params(params)
    )
    try:
        return define_runs(
            chapter, params, cohort, tables, pipeline_training=pipeline.get("training", {})
        )
    except KeyError as err:
        raise ConfigError(f"{chapter}: the parameter {err} is missing") from None


LOCK_FILE = ".neonb-train.lock"
"""Held in a run folder by the ``neonb train`` that trains it (process 0)."""


@contextlib.contextmanager
def _lock(run: Run) -> Iterator[None]:
    """Refuse a second ``neonb train`` of the same run while one runs (process 0 locks)."""
    if not distributed.is_main():
        yield
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run.run_dir / LOCK_FILE, "a neonb train"):
        yield


def _check_needs(runs: Sequence[Run], params_dir: str) -> None:
    """Raise when a run starts from one that has not finished and is not trained before it."""
    trained_before: set[tuple[str, str]] = set()
    problems = []
    for run in runs:
        unmet = [n for n in run.unmet() if (n.chapter, n.run) not in trained_before]
        if unmet:
            problems.append(_unmet_message(run, unmet, params_dir))
        trained_before.add((run.chapter, run.id))
    if problems:
        raise ConfigError("; ".join(problems))


def list_runs(
    params_dir: str | os.PathLike,
    chapter: str,
    *,
    data_root: str | os.PathLike | None = None,
    echo: Callable[..., None] = print,
) -> pd.DataFrame:
    """Print (and return) a chapter's runs and whether each is finished, partial or not started."""
    with distributed.main_first():
        runs = load_chapter(params_dir, chapter, data_root=data_root)
    table = runs.table()
    if distributed.is_main():
        echo(f"{runs.chapter}: {len(runs)} run(s) in {runs.folder}")
        echo(table.to_string(index=False))
    return table


def train_chapter(
    params_dir: str | os.PathLike,
    chapter: str,
    run_ids: Sequence[str] | None = None,
    *,
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
    echo: Callable[..., None] = print,
) -> dict[str, TrainedRun]:
    """Train a chapter's runs (all, or those of ``run_ids``), as its notebook would.

    A finished run is left as it is, a partial one resumes from its checkpoint. Under
    torchrun (:func:`neonb.distributed.init_from_env`) every process calls this: process 0
    first reads or draws the splits and writes the cohort and caches the others read back;
    each run then trains with DistributedDataParallel (:func:`neonb.engine.fit`), except a
    staged AgeU-Net head, which process 0 trains alone while the others wait. Only process
    0 prints.

    Returns:
        Run id → trained run, for the runs trained or found finished (on process 0; the
        staged head is missing on the others).

    Raises:
        ConfigError: for unknown run ids (naming the chapter's), or a run that starts from
            another that has not finished and is not among those to train before it.
        DataError: when another ``neonb train`` is training the same run
            (:data:`LOCK_FILE` in its folder).
    """
    say = echo if distributed.is_main() else lambda *args, **kwargs: None
    with distributed.main_first():
        runs = load_chapter(params_dir, chapter, data_root=data_root)
    selected = runs.select(run_ids)
    _check_needs(selected, str(params_dir))
    world = distributed.world_size()
    trained = {}
    for run in selected:
        status = run.status()
        if status == FINISHED:
            say(f"{run.chapter} {run.id}: finished, not trained again ({run.run_dir})")
            continue
        what = "resuming" if status == PARTIAL else "training"
        where = f"{world} processes" if world > 1 and not run.head_only else "1 process"
        say(f"{run.chapter} {run.id}: {what} in {run.run_dir} on {where} ...")
        started = time.perf_counter()
        with _lock(run):
            if run.head_only and distributed.is_distributed():
                if distributed.is_main():
                    trained[run.id] = run.train(progress)
                distributed.barrier()
            else:
                trained[run.id] = run.train(progress)
        if run.id in trained:
            best = trained[run.id].best
            say(
                f"{run.chapter} {run.id}: {len(trained[run.id].log)} epochs, best validation "
                f"Dice (no BG) {best['val_dice_nobg']:.3f} at epoch {int(best['epoch'])}, "
                f"{time.perf_counter() - started:.0f} s"
            )
    return trained
