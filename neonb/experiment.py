"""Train and evaluate segmentation runs: the glue the study notebooks share.

An *experiment* here is what a notebook does with neonb's parts: build disk-cached
datasets (:class:`neonb.cache.VolumeDataset`) from session records
(:func:`neonb.data.to_data_dicts`), train a DynUNet with the masked Dice + cross-entropy
loss under deep supervision (:func:`train_segmentation`), and evaluate it on whole test
volumes with sliding windows (:func:`prepare_volumes`, then :func:`evaluate`: Dice per
class, optionally HD95, a window hook such as the AgeU-Net's age, and the predicted
segmentations as NIfTI files named as BIDS derivatives).

Every setting of a run is one :class:`TrainingConfig`, which reads and writes plain
dictionaries so the notebooks take it from their papermill parameters and the run folder
records it (``config.yaml``), the input channels included (``channels``: T1w and T2w as in
the paper, or either alone). The run folder also records its validation sessions
(``val_sessions.tsv``), on which ``neonb export`` calibrates the model's QC threshold.

Example:
    >>> config = TrainingConfig.from_dict({"patch_size": [48, 48, 48], "epochs": 2})
    >>> run = train_segmentation(train_records, val_records, config, "runs/baseline")
    >>> volumes = prepare_volumes(test_records, cache_dir=config.cache_dir,
    ...                           channels=config.channels)
    >>> scores = evaluate(run.model, volumes, config, hd95=True, out_dir="runs/baseline/test")
    >>> neonb.metrics.case_summary(scores.per_class)    # one row per session
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm import tqdm

from neonb.cache import VolumeDataset
from neonb.distributed import is_main, per_process_batch
from neonb.engine import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    LOG_FILE,
    EpochSampler,
    SeededSamples,
    fit,
    make_loader,
    poly_scheduler,
    sgd_nesterov,
)
from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write
from neonb.inference import (
    check_overlap,
    compile_network,
    default_sw_batch_size,
    load_weights,
    save_segmentation,
    segment,
)
from neonb.losses import SegmentationLoss, deep_supervision_weights
from neonb.metrics import evaluate_case
from neonb.models import (
    ModelConfig,
    build_model,
    check_channels,
    check_patch_size,
    reference_channel,
)
from neonb.synthesis import SynthesisConfig
from neonb.transforms import (
    MODALITY_KEYS,
    AugmentationConfig,
    augmentation_transforms,
    preprocessing_transforms,
    validation_transforms,
)

OPTIMIZERS = ("sgd", "adamw")
Record = Mapping[str, Any]
"""A session as a MONAI data dict: ``t1w``, ``t2w``, ``label`` paths, ``scan_age``, ids."""

VAL_SESSIONS_FILE = "val_sessions.tsv"
"""The validation sessions of a run, written into its folder by :func:`train_segmentation`
as a manifest :func:`neonb.segmentation.read_batch` reads (``neonb export`` calibrates the
model's QC threshold on them)."""

VAL_SESSION_COLUMNS: tuple[str, ...] = (
    "participant_id", "session_id", "scan_age", "t1w", "t2w", "dseg",
)  # fmt: skip
"""Columns of :data:`VAL_SESSIONS_FILE`; image paths are absolute, ``n/a`` where a session
has no such image."""


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of one training run; the defaults are the paper's (§3.2, §4.1.1).

    Where the paper states no value, the attribute says where the default comes from: the
    authors' public code (github.com/richterleo/Neonatal_Brain_Segmentation), nnU-Net, or
    neonb's choice.

    Attributes:
        channels: the input images, stacked in this order into the network's channels:
            ``("t1w", "t2w")`` (the paper's, §3.2.1), ``("t2w",)`` or ``("t1w",)``
            (:data:`neonb.models.INPUT_CHANNELS`). ``model.in_channels`` must equal their
            number; :meth:`from_dict` sets it when the values leave it out. A session needs
            only the images of these channels (and its label).
        patch_size: training patch and sliding-window size in voxels, ``(X, Y, Z)``.
        batch_size: patches per optimiser step (paper: 2, "should not be undercut", §3.2.1),
            all processes together: under torchrun each of N processes draws
            ``batch_size / N`` (which must be whole) and the learning rate is not changed, so
            N processes take the steps of one.
        epochs: training epochs (paper: 60).
        samples_per_volume: random patches drawn from each training volume per epoch;
            one, as in the authors' public code (an epoch is one pass over the training
            volumes; the paper does not say).
        optimizer: ``"sgd"`` (the paper's SGD with Nesterov momentum) or ``"adamw"``.
            AdamW converges in far fewer steps, which the CPU demo needs: on the 1.5 mm
            synthetic cohort (48³ patches, batch 2), after 380 steps the validation Dice
            (no BG) was 0.59 with SGD (lr 1e-2) and 0.89 with AdamW (lr 3e-3).
        learning_rate: initial learning rate (paper: 1e-2 with SGD).
        momentum: Nesterov momentum of SGD (paper: 0.99).
        weight_decay: L2 weight decay. The paper names weight decay without a value; 3e-5
            is nnU-Net's and the authors' public code's.
        poly_power: exponent of the poly schedule ``(1 - epoch / epochs) ** power`` (paper:
            0.9).
        overlap: overlap of neighbouring sliding windows at test time, in [0, 1); 0.5 is
            the authors' public code's (the paper gives none).
        num_workers: data-loading worker processes for the random patches and augmentation
            (0: the main process). Every sample's random patch and augmentation are seeded
            from the seed, the epoch and the sample's place in the epoch, so results do not
            depend on the number of workers (nor of training processes).
        cache_dir: folder of the disk cache of pre-processed volumes
            (:class:`neonb.cache.VolumeDataset`; relative to the working directory);
            ``None``: ``cache`` beside the run folder (:func:`train_segmentation`). Runs
            and chapters that share it pre-process each session once.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
        seed: fixes initialisation, patch sampling and augmentation.
        model: the network, :class:`neonb.models.ModelConfig`.
        augmentation: probabilities and ranges, :class:`neonb.transforms.AugmentationConfig`
            (neonb's defaults after nnU-Net's; the paper gives none).
        synthesis: domain randomisation (:class:`neonb.synthesis.SynthesisConfig`): most
            training patches get an image synthesised from their labels with random
            contrast, bias field, resolution and noise, in place of the real one; ``None``
            (the paper's training): the real images only.
        val_every: validate every this many epochs, and after the last one (1: every
            epoch, as the authors' code). The best checkpoint is chosen among the validated
            epochs. The demo's budgeting and transfer runs validate every second epoch, to
            fit slower machines (neonb's choice).
    """

    channels: tuple[str, ...] = MODALITY_KEYS
    patch_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2
    epochs: int = 60
    samples_per_volume: int = 1
    optimizer: str = "sgd"
    learning_rate: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    overlap: float = 0.5
    num_workers: int = 0
    cache_dir: str | None = None
    device: str = "auto"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    synthesis: SynthesisConfig | None = None
    val_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", check_channels(self.channels))
        if self.model.in_channels != len(self.channels):
            raise ConfigError(
                f"model.in_channels is {self.model.in_channels} but channels "
                f"{list(self.channels)} are {len(self.channels)}: leave model.in_channels out "
                "(it follows channels) or make them agree"
            )
        object.__setattr__(self, "patch_size", check_patch_size(self.patch_size, self.model))
        for name in ("batch_size", "epochs", "samples_per_volume", "val_every"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        check_overlap(self.overlap)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.num_workers, bool) or int(self.num_workers) != self.num_workers:
            raise ConfigError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """Build from plain values (YAML, papermill); ``model`` and ``augmentation`` nested.

        ``channels`` defaults to ``["t1w", "t2w"]`` (so a ``config.yaml`` written before
        runs recorded their channels reads as the paper's two-channel run), and
        ``model.in_channels``, when left out, to the number of channels.

        Raises:
            ConfigError: naming any key that is not a setting, channels that are not one of
                :data:`neonb.models.INPUT_CHANNELS`, or a ``model.in_channels`` that
                contradicts them.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(
                f"unknown training setting(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        values = dict(values)
        channels = check_channels(values.pop("channels", list(MODALITY_KEYS)))
        model_values = dict(values.pop("model", None) or {})
        model_values.setdefault("in_channels", len(channels))
        model = ModelConfig.from_dict(model_values)
        augmentation = AugmentationConfig.from_dict(values.pop("augmentation", {}))
        synthesis = values.pop("synthesis", None)
        if synthesis is not None and not isinstance(synthesis, SynthesisConfig):
            synthesis = SynthesisConfig.from_dict(synthesis)
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(
            channels=channels,
            model=model,
            augmentation=augmentation,
            synthesis=synthesis,
            **values,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values that :meth:`from_dict` reads back (YAML and JSON friendly)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["channels"] = list(self.channels)
        values["patch_size"] = list(self.patch_size)
        values["model"] = self.model.to_dict()
        values["augmentation"] = self.augmentation.to_dict()
        values["synthesis"] = None if self.synthesis is None else self.synthesis.to_dict()
        return values

    def replace(self, **changes: Any) -> TrainingConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class TrainedRun:
    """The outcome of :func:`train_segmentation`.

    Attributes:
        model: the network with the weights of its best validation epoch, in eval mode.
        log: the epoch log (``log.tsv``).
        run_dir: the run folder with checkpoints, log, config and environment record.
        train_time_s: wall-clock time of the training epochs, summed from the log.
    """

    model: nn.Module
    log: pd.DataFrame
    run_dir: Path
    train_time_s: float

    @property
    def best(self) -> pd.Series:
        """The log row of the epoch with the best validation Dice (no background)."""
        return self.log.loc[self.log["val_dice_nobg"].idxmax()]


def _check_records(
    records: Sequence[Record], what: str, channels: Sequence[str] = MODALITY_KEYS
) -> list[dict[str, Any]]:
    """The records as dicts holding only the images of ``channels`` (and the label).

    The other modality is dropped, so a session needs only the files of the run's channels
    and its cache entry does not depend on the others (:func:`neonb.cache.record_key`).

    Raises:
        ConfigError: for no record, or a record without an image of ``channels`` or a label.
    """
    if len(records) == 0:
        raise ConfigError(f"no {what} sessions given")
    unused = [key for key in MODALITY_KEYS if key not in channels]
    checked = []
    for record in records:
        missing = [key for key in (*channels, "label") if record.get(key) is None]
        if missing:
            session = f"sub-{record.get('participant_id')} ses-{record.get('session_id')}"
            raise ConfigError(
                f"{what} session {session} lacks {missing}: the run's channels are "
                f"{list(channels)}, and each session needs their images and its label"
            )
        checked.append({key: value for key, value in record.items() if key not in unused})
    return checked


def _cache_dir(config: TrainingConfig, cache_dir: str | os.PathLike | None) -> Path | None:
    """``cache_dir`` if given, else ``config.cache_dir`` (``None``: no cache)."""
    chosen = cache_dir if cache_dir is not None else config.cache_dir
    return None if chosen is None else Path(chosen)


def training_loader(
    records: Sequence[Record],
    config: TrainingConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> torch.utils.data.DataLoader:
    """Augmented training patches, ``samples_per_volume`` per volume and epoch.

    Loading, cropping and normalisation run once per session into the disk cache
    (:class:`neonb.cache.VolumeDataset`); the random patch and augmentation run afresh
    every epoch, in ``config.num_workers`` worker processes. The epoch's order of
    sessions and each sample's random transforms are seeded from ``config.seed``, the
    epoch and the sample's place in the epoch (:class:`neonb.engine.EpochSampler`,
    :class:`neonb.engine.SeededSamples`), so the patches do not depend on the number of
    workers or processes. Under torchrun each process draws its share:
    ``config.batch_size`` is the batch of one optimiser step, all processes together
    (:func:`neonb.distributed.per_process_batch`).

    Args:
        records: training sessions, each with the images of ``config.channels`` and a label.
        config: channels, patch size, augmentation, batch size, workers and seed.
        cache_dir: the cache folder (default ``config.cache_dir``; ``None`` for both:
            no cache, every epoch pre-processes again).
    """
    dataset = VolumeDataset(
        _check_records(records, "training", config.channels),
        preprocessing_transforms(crop=True, keep_box=True, channels=config.channels),
        augmentation_transforms(
            config.patch_size, config.augmentation, model=config.model, synthesis=config.synthesis
        ),
        cache_dir=_cache_dir(config, cache_dir),
    )
    sampler = EpochSampler(
        len(dataset), len(dataset) * config.samples_per_volume, shuffle=True, seed=config.seed
    )
    return make_loader(
        SeededSamples(dataset),
        per_process_batch(config.batch_size),
        seed=config.seed,
        num_workers=config.num_workers,
        sampler=sampler,
        drop_last=False,
    )


def validation_loader(
    records: Sequence[Record],
    config: TrainingConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> torch.utils.data.DataLoader:
    """One centre patch of the training patch size per validation volume.

    The paper validates on patches of the training size (§4.1.1); taking the centre one is
    neonb's choice (the authors' public code crops a random patch each epoch).

    Pre-processed through the same disk cache as :func:`training_loader`.
    """
    dataset = VolumeDataset(
        _check_records(records, "validation", config.channels),
        preprocessing_transforms(crop=True, keep_box=True, channels=config.channels),
        validation_transforms(config.patch_size, model=config.model),
        cache_dir=_cache_dir(config, cache_dir),
    )
    return make_loader(dataset, config.batch_size, num_workers=config.num_workers)


def default_cache_dir(config: TrainingConfig, run_dir: str | os.PathLike) -> Path:
    """Where :func:`train_segmentation` caches: ``config.cache_dir``, else ``cache`` beside
    ``run_dir`` (shared by the runs of one chapter)."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    return Path(run_dir).parent / "cache"


def build_optimizer(
    params: Sequence[nn.Parameter], config: TrainingConfig
) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names, over ``params``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return sgd_nesterov(
        params,
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def segmentation_loss(config: TrainingConfig) -> SegmentationLoss:
    """Masked Dice + CE over every deep-supervision head, weights halving per level."""
    heads = 1 + config.model.deep_supr_num if config.model.deep_supervision else 1
    return SegmentationLoss(deep_supervision_weights(heads))


def train_segmentation(
    train_records: Sequence[Record],
    val_records: Sequence[Record],
    config: TrainingConfig,
    run_dir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    segmentation_logits: Callable[[Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> TrainedRun:
    """Train a segmentation network and return it with the weights of its best epoch.

    An existing ``run_dir`` with a checkpoint is resumed (see :func:`neonb.engine.fit`);
    one that has finished all epochs is simply reloaded, so re-running a notebook reuses
    a trained model instead of training it again. Pre-processed volumes are cached in
    :func:`default_cache_dir`. The validation sessions are recorded in the run folder
    (:data:`VAL_SESSIONS_FILE`, :func:`write_val_sessions`), where ``neonb export`` finds
    them to calibrate the model's QC threshold.

    Args:
        train_records: training sessions (MONAI data dicts), each with the images of
            ``config.channels`` and a label.
        val_records: validation sessions.
        config: the run's settings.
        run_dir: the run folder.
        model: a network to train (default: ``build_model(config.model)``, initialised
            from ``config.seed``). Parameters with ``requires_grad=False`` stay frozen.
        loss_fn: ``loss_fn(outputs, batch)`` (default: :func:`segmentation_loss`).
        optimizer: default :func:`build_optimizer` over the trainable parameters.
        segmentation_logits: picks the segmentation logits out of the model's outputs
            for validation (needed for models with more than one output).
        progress: show progress bars.

    Returns:
        The trained run.
    """
    if model is None:
        torch.manual_seed(config.seed)
        model = build_model(config.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameter")
    optimizer = optimizer or build_optimizer(trainable, config)
    cache = default_cache_dir(config, run_dir)
    log = fit(
        model,
        loss_fn or segmentation_loss(config),
        optimizer,
        training_loader(train_records, config, cache_dir=cache),
        validation_loader(val_records, config, cache_dir=cache),
        epochs=config.epochs,
        val_every=config.val_every,
        run_dir=run_dir,
        scheduler=poly_scheduler(optimizer, config.epochs, power=config.poly_power),
        device=config.device,
        seed=config.seed,
        progress=progress,
        segmentation_logits=segmentation_logits,
        config=config.to_dict(),
    )
    run_dir = Path(run_dir)
    if is_main():
        write_val_sessions(val_records, run_dir / VAL_SESSIONS_FILE)
    load_weights(model, run_dir / BEST_MODEL_FILE)
    model.eval()
    return TrainedRun(model, log, run_dir, float(log["epoch_time_s"].sum()))


def _absolute_path(value: Any) -> str:
    """A record's image as an absolute path, ``""`` for none; an array cannot be recorded."""
    if value is None:
        return ""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"an image given as {type(value).__name__}, not as a file")
    return os.path.abspath(value)


def write_val_sessions(records: Sequence[Record], path: str | os.PathLike) -> Path | None:
    """Write a run's validation sessions as a manifest TSV (:data:`VAL_SESSION_COLUMNS`).

    The file is what :func:`neonb.segmentation.read_batch` reads: ids, scan age and the
    absolute paths of the T1w, T2w and label (``dseg``) images. Written atomically.

    Args:
        records: the validation sessions (MONAI data dicts).
        path: the file to write, e.g. ``run_dir / VAL_SESSIONS_FILE``.

    Returns:
        ``path``, or ``None`` when a session's images are arrays rather than files (nothing
        to record; an earlier file at ``path`` is removed, as it would name other sessions).
    """
    path = Path(path)
    try:
        rows = [
            {
                "participant_id": record["participant_id"],
                "session_id": record["session_id"],
                "scan_age": float(record.get("scan_age", np.nan)),
                "t1w": _absolute_path(record.get("t1w")),
                "t2w": _absolute_path(record.get("t2w")),
                "dseg": _absolute_path(record.get("label")),
            }
            for record in records
        ]
    except (KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    table = pd.DataFrame(rows, columns=list(VAL_SESSION_COLUMNS))
    return atomic_write(
        path,
        lambda tmp: table.to_csv(tmp, sep="\t", index=False, na_rep="n/a"),
    )


class PreparedVolumes(Sequence[dict[str, Any]]):
    """Whole test volumes, read one at a time from the disk cache (:func:`prepare_volumes`).

    Indexing (or iterating) gives one dict per session: ``image`` (C, X, Y, Z) on the stored
    grid (not cropped, z-normalised as in :func:`neonb.transforms.eval_transforms`; one
    channel per entry of ``channels``), ``label`` (X, Y, Z) uint8, the ids and scan age of
    the record, ``reference``, the path of the image of :func:`reference_channel` (the voxel
    size of HD95 and the reference grid of a written prediction), and ``t2w``, the path of
    the T2w image when the session has one. Only the volume being used is in memory: 100
    dHCP test volumes at 0.5 mm would take 16 GB held together.
    """

    def __init__(
        self,
        records: Sequence[Record],
        cache_dir: str | os.PathLike | None,
        channels: Sequence[str] = MODALITY_KEYS,
    ) -> None:
        self.channels = check_channels(channels)
        self.dataset = VolumeDataset(
            records, preprocessing_transforms(crop=False, channels=self.channels), None, cache_dir
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError(f"PreparedVolumes takes an integer index, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"volume {index} of {len(self)}")
        index %= len(self)
        record = self.dataset.data[index]
        sample = self.dataset.preprocessed(index)
        volume = {
            "image": sample["image"],
            "label": np.asarray(sample["label"][0], dtype=np.uint8),
            "participant_id": record["participant_id"],
            "session_id": record["session_id"],
            "scan_age": float(record.get("scan_age", np.nan)),
            "reference": record[reference_channel(self.channels)],
        }
        if record.get("t2w") is not None:
            volume["t2w"] = record["t2w"]
        return volume


def prepare_volumes(
    records: Sequence[Record],
    *,
    cache_dir: str | os.PathLike | None = None,
    channels: Sequence[str] = MODALITY_KEYS,
) -> PreparedVolumes:
    """Test volumes for :func:`evaluate`, pre-processed once for every network scored on them.

    Args:
        records: sessions with the images of ``channels``, ``label``, ids and ``scan_age``.
        cache_dir: the disk cache (e.g. ``config.cache_dir``); ``None``: none, so each
            pass over the volumes loads and normalises them again.
        channels: the networks' input channels (``config.channels``); the disk cache keeps
            the volumes of each choice of channels apart.

    Returns:
        A sequence of one dict per session, loaded when indexed (:class:`PreparedVolumes`):
        ``image`` (C, X, Y, Z) on the stored grid (not cropped, z-normalised as in
        :func:`neonb.transforms.eval_transforms`), ``label`` (X, Y, Z) uint8, the ids and
        scan age of the record, the path of its ``reference`` image (the T2w, or the first
        channel without one) and of its ``t2w`` image (when it has one).

    Raises:
        ConfigError: for no records, channels that are not one of
            :data:`neonb.models.INPUT_CHANNELS`, or a record without their images.
    """
    channels = check_channels(channels)
    return PreparedVolumes(_check_records(records, "evaluation", channels), cache_dir, channels)


def optimizer_steps(n_volumes: int, config: TrainingConfig) -> int:
    """Optimiser steps of a run: ``epochs * ceil(n_volumes * samples_per_volume / batch)``."""
    per_epoch = math.ceil(n_volumes * config.samples_per_volume / config.batch_size)
    return config.epochs * per_epoch


def load_trained_run(run_dir: str | os.PathLike) -> tuple[TrainedRun, TrainingConfig]:
    """Reload a finished run from its folder, without training data or retraining.

    The later chapters use this to take the pipeline chapter's baseline as it was trained:
    the network is rebuilt from ``config.yaml`` and given the weights of the best epoch.

    Args:
        run_dir: a run folder written by :func:`train_segmentation`.

    Returns:
        The run (model in eval mode, log, folder, training time) and its settings.

    Raises:
        DataError: naming the file when the folder lacks its config, log or weights
            (typically: the chapter that trains this run has not been executed yet).
    """
    run_dir = Path(run_dir)
    config, log = read_finished_run(run_dir)
    model = build_model(config.model)
    load_weights(model, run_dir / BEST_MODEL_FILE)
    model.eval()
    return TrainedRun(model, log, run_dir, float(log["epoch_time_s"].sum())), config


def read_finished_run(
    run_dir: str | os.PathLike,
    *,
    extra_files: Sequence[str] = (),
    chapter: str = "01_pipeline",
) -> tuple[TrainingConfig, pd.DataFrame]:
    """The settings and epoch log of a finished run folder, after checking it is complete.

    Args:
        run_dir: a run folder.
        extra_files: files the folder must hold besides ``config.yaml``, ``log.tsv`` and
            the best weights (e.g. an AgeU-Net's ``age_head.yaml``).
        chapter: the notebook that trains such runs, named in the error.

    Raises:
        DataError: naming the first missing file and the notebook to run.
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, LOG_FILE, BEST_MODEL_FILE, *extra_files):
        if not (run_dir / name).is_file():
            raise DataError(
                run_dir / name,
                "missing: this run has not finished",
                f"run the chapter that trains it first (notebooks/{chapter}.ipynb)",
            )
    values = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    return TrainingConfig.from_dict(values), pd.read_csv(run_dir / LOG_FILE, sep="\t")


def prediction_filename(participant_id: str, session_id: str) -> str:
    """BIDS-derivative name of a predicted segmentation, ``sub-X_ses-Y_desc-neonb_dseg.nii.gz``."""
    return f"sub-{participant_id}_ses-{session_id}_desc-neonb_dseg.nii.gz"


class WindowHook(Protocol):
    """Something recorded from every sliding window while a volume is segmented.

    An instance is a ``segmentation_logits`` function (:func:`neonb.inference.segment`): it
    is called on the model output of every batch of windows, records what it wants, and
    returns the segmentation logits ``(B, C, X, Y, Z)``. After the volume, :meth:`summary`
    gives the columns it adds to the volume's row of :func:`evaluate`.
    :class:`neonb.ageunet.WindowAges` is one: the AgeU-Net's age of every window.
    """

    def __call__(self, outputs: Any) -> torch.Tensor: ...

    def summary(self) -> dict[str, Any]: ...


class Evaluation(NamedTuple):
    """The scores of :func:`evaluate`.

    Attributes:
        per_class: one row per volume and class: ``participant_id``, ``session_id``,
            ``scan_age``, ``label`` (class index), ``short_name``, ``is_background``,
            ``dice``; with ``hd95=True`` also ``hd95_mm``, ``volume_pred_ml`` and
            ``volume_true_ml`` (:func:`neonb.metrics.evaluate_case`); last ``inference_s``,
            the volume's segmentation time in seconds.
        per_volume: one row per volume: ``participant_id``, ``session_id``, ``scan_age``,
            the columns of the window hook's summary (e.g. ``age_mean``,
            ``age_foreground_weighted``, ``n_windows``) and ``inference_s``.
    """

    per_class: pd.DataFrame
    per_volume: pd.DataFrame


VOLUME_KEYS = ("image", "label", "participant_id", "session_id")
"""Keys every volume given to :func:`evaluate` has (:func:`prepare_volumes` gives them)."""


def _reference_image(volume: Mapping[str, Any]) -> Any:
    """The image a volume's prediction is measured and written on: ``reference``, else ``t2w``."""
    return volume.get("reference", volume.get("t2w"))


def _check_volume(volume: Mapping[str, Any], needs_reference: bool, channels: int) -> None:
    missing = [key for key in VOLUME_KEYS if key not in volume]
    if needs_reference and _reference_image(volume) is None:
        missing.append("reference")
    if missing:
        raise ConfigError(
            f"a volume to evaluate lacks {missing} (it has {sorted(volume)}); "
            "prepare the volumes with neonb.experiment.prepare_volumes"
        )
    found = int(volume["image"].shape[0])
    if found != channels:
        raise ConfigError(
            f"a volume to evaluate has {found} image channels but the network takes {channels}; "
            "prepare the volumes with prepare_volumes(records, channels=config.channels)"
        )


def evaluate(
    model: nn.Module,
    volumes: Sequence[Mapping[str, Any]],
    config: TrainingConfig,
    *,
    hd95: bool = False,
    window_hook: Callable[[], WindowHook] | None = None,
    segmentation_logits: Callable[[Any], torch.Tensor] | None = None,
    out_dir: str | os.PathLike | None = None,
    sw_batch_size: int | None = None,
    backend: str = "torch",
    progress: bool = False,
) -> Evaluation:
    """Segment whole volumes with overlapping sliding windows and score every class.

    The one evaluation of the study: each volume is segmented by
    :func:`neonb.inference.segment` (windows of ``config.patch_size`` with
    ``config.overlap`` inside the foreground box, softmax probabilities averaged, argmax)
    and scored per class with Dice (:func:`neonb.metrics.evaluate_case`), optionally with
    HD95 and class volumes. Volumes keep their stored grid (normalised, not cropped), so a
    prediction lies on the input's voxels and is written with the affine and header of the
    volume's ``reference`` image (the T2w, or the first channel of a run without T2w). The
    volumes are prepared once (:func:`prepare_volumes`) and scored by as many networks as
    needed.

    Args:
        model: the trained network.
        volumes: rows of :func:`prepare_volumes` with ``channels=config.channels``
            (``image`` (C, X, Y, Z), ``label`` (X, Y, Z), ``participant_id``,
            ``session_id``, ``scan_age``, ``reference`` or ``t2w``).
        config: gives the channels, window size (``patch_size``), ``overlap`` and ``device``.
        hd95: also compute the 95th-percentile Hausdorff distance (mm) and the predicted
            and true volume (mL) of every class, at the voxel size of the ``reference``
            image's header. Off by default: on a CPU it costs about as much as the segmentation.
        window_hook: called once per volume to make a :class:`WindowHook` that picks the
            segmentation logits of every batch of windows and records something per window;
            its summary becomes columns of ``per_volume``. For the AgeU-Net's age:
            ``window_hook=neonb.ageunet.WindowAges``.
        segmentation_logits: picks the logits out of the output of a model with more than
            one output (not with ``window_hook``, which does that itself).
        out_dir: where to write ``sub-X_ses-Y_desc-neonb_dseg.nii.gz``
            (:func:`prediction_filename`; ``None``: don't write them).
        sw_batch_size: windows per forward pass (``None``: as many as
            :func:`neonb.inference.default_sw_batch_size` allows, as ``neonb segment`` does).
            Several at once are faster on a CPU; the labels may differ from one at a time in
            float rounding only.
        backend: what runs the windows (:data:`neonb.inference.BACKENDS`): ``"torch"``
            (default), ``"openvino"`` or ``"auto"`` (OpenVINO on the CPU where installed).
            The network is compiled once for all volumes (about 1.5 s for the demo's); the
            labels differ from PyTorch's in float rounding only. It pays where a network
            scores many volumes with large windows (chapters 01 and 06).
        progress: show a progress bar.

    Returns:
        The per-class and per-volume rows (:class:`Evaluation`).

    Raises:
        ConfigError: for no volumes, a volume without the keys above or with another
            number of channels than ``config.channels``, or both ``window_hook`` and
            ``segmentation_logits``.
    """
    if len(volumes) == 0:
        raise ConfigError("no evaluation volumes given")
    if window_hook is not None and segmentation_logits is not None:
        raise ConfigError(
            "give window_hook or segmentation_logits, not both: the hook picks the logits"
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    network = compile_network(
        model, patch_size=config.patch_size, backend=backend, device=config.device
    )
    tables, rows = [], []
    for volume in tqdm(volumes, desc="sliding-window inference", disable=not progress):
        _check_volume(volume, hd95 or out_dir is not None, len(config.channels))
        hook = window_hook() if window_hook is not None else None
        started = time.perf_counter()
        predicted = segment(
            network,
            volume["image"],
            patch_size=config.patch_size,
            overlap=config.overlap,
            device=config.device,
            sw_batch_size=sw_batch_size or default_sw_batch_size(config.patch_size),
            segmentation_logits=segmentation_logits if hook is None else hook,
        )
        seconds = time.perf_counter() - started
        ids = {
            "participant_id": volume["participant_id"],
            "session_id": volume["session_id"],
            "scan_age": volume.get("scan_age", np.nan),
        }
        spacing = nib.load(_reference_image(volume)).header.get_zooms()[:3] if hd95 else None
        tables.append(
            evaluate_case(predicted, volume["label"], spacing, ids).assign(inference_s=seconds)
        )
        summary = {} if hook is None else hook.summary()
        rows.append({**ids, **summary, "inference_s": seconds})
        if out_dir is not None:
            name = prediction_filename(volume["participant_id"], volume["session_id"])
            save_segmentation(predicted, _reference_image(volume), out_dir / name)
    return Evaluation(pd.concat(tables, ignore_index=True), pd.DataFrame(rows))
