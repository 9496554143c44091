"""A trained run as a self-contained model folder: safetensors weights plus JSON metadata.

A run folder (:func:`neonb.experiment.train_segmentation`) holds pickled PyTorch checkpoints
and training bookkeeping; what a researcher needs to segment their own scans is less, and
must be safe to download from a stranger. :func:`export_run` writes::

    MODEL_DIR/model.safetensors   the network's weights (safetensors: tensors only, no code)
    MODEL_DIR/model.json          everything else, as plain JSON (:data:`METADATA_FILE`)
    MODEL_DIR/norms.json          tissue-volume centiles against scan age (:func:`write_norms`)

The metadata say how the network was trained and how to feed it: the architecture
(``DynUNet`` or ``AgeUNet``, with its :class:`~neonb.models.ModelConfig` and age-head
settings), the label table, the input channels in their order, the patch size and
sliding-window overlap, the intensity normalisation, the voxel size (mm) and orientation
(axis codes such as ``"RAS"``) of the training images, a description of the training data,
the best validation scores from ``log.tsv``, the training environment and the neonb
version. :func:`load_exported_model` rebuilds the network from them.

Loading never unpickles: the weights are read with :func:`safetensors.torch.load_model`
and the metadata with :func:`json.loads`, so a file crafted to run code when loaded is
refused, not run. (Exporting reads the run's ``model_best.pt`` with
``torch.load(weights_only=True)``, which refuses such files too.)

The run folder does not record the voxel grid it was trained on, so :func:`export_run`
takes it from the training data (``data_root``: every session's T2w header is read) or
from explicit ``voxel_size`` and ``orientation`` values, and refuses to guess.

Example:
    >>> export_run("results/demo/01_pipeline/run-0", "models/demo",
    ...            data_root="data/synthetic-n60-1.5mm-seed0")  # doctest: +SKIP
    >>> exported = load_exported_model("models/demo")  # doctest: +SKIP
    >>> exported.voxel_size_mm, exported.orientation  # doctest: +SKIP
    ((1.5, 1.5, 1.5), 'RAS')
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml
from nibabel.filebasedimages import ImageFileError
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from neonb import __version__
from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write, default_file_mode, read_json
from neonb.labels import label_table
from neonb.models import INPUT_CHANNELS, ModelConfig, build_model, check_patch_size

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_FILTERS",
    "MAX_LEVELS",
    "MAX_PARAMETERS",
    "MAX_PATCH_VOXELS",
    "METADATA_FILE",
    "NORMALISATION",
    "QC_QUANTILE",
    "WEIGHTS_FILE",
    "ExportedModel",
    "calibrate_qc",
    "describe_qc",
    "export_run",
    "load_exported_model",
    "training_grid",
    "write_norms",
    "write_qc",
]

WEIGHTS_FILE = "model.safetensors"
"""Name of the weights file in a model folder."""

METADATA_FILE = "model.json"
"""Name of the metadata file in a model folder."""

FORMAT = "neonb-model"
"""The ``format`` field of :data:`METADATA_FILE`."""

FORMAT_VERSION = 1
"""Version of the model-folder layout; a loader refuses newer versions."""

CHANNELS_BY_COUNT: dict[int, tuple[str, ...]] = {2: ("t1w", "t2w"), 1: ("t2w",)}
"""Input channels, in order, of a network with this many input channels: the guess for a
run folder whose ``config.yaml`` predates ``channels`` (:func:`_run_channels`)."""

NORMALISATION: dict[str, Any] = {
    "method": "zscore",
    "nonzero": True,
    "channel_wise": True,
    "crop_foreground": True,
    "description": "each channel z-scored over its non-zero voxels (zeros stay 0), as "
    "monai.transforms.NormalizeIntensity(nonzero=True, channel_wise=True); prediction is "
    "restricted to the bounding box of the non-zero voxels",
}
"""The intensity pre-processing of :func:`neonb.transforms.preprocessing_transforms`."""

VOXEL_SIZE_ATOL_MM = 1e-3
"""Voxel sizes closer than this (mm) count as equal."""

MAX_METADATA_BYTES = 16 * 2**20
"""Largest :data:`METADATA_FILE` read (an export writes a few kB)."""

MAX_LEVELS = 10
"""Most resolution levels (entries of ``strides``) a model may have (the paper's: 6)."""

MAX_FILTERS = 2048
"""Most feature maps at any level (nnU-Net's largest: 320)."""

MAX_KERNEL_SIZE = 7
"""Largest convolution kernel, per axis (nnU-Net's: 3)."""

MAX_STRIDE = 4
"""Largest stride of one level, per axis (nnU-Net's: 2)."""

MAX_PATCH_VOXELS = 256
"""Largest sliding-window size along any axis (the paper's: 128)."""

MAX_PARAMETERS = 500_000_000
"""Most network parameters (2 GB as float32; the paper's network has about 31 million),
counted on PyTorch's "meta" device before anything is allocated."""

MAX_VOXEL_SIZE_MM = 100.0
"""Largest training voxel size a model may record."""

MAX_LABELS = 256
"""Most classes: labels are written as uint8."""

QC_QUANTILE = 0.95
"""Quantile of the calibration sessions' QC scores taken as a model's QC threshold: about
one session in twenty like them is flagged by ``neonb segment --tta``."""

_COLOUR = re.compile(r"^#[0-9A-Fa-f]{6}$")


@dataclass
class ExportedModel:
    """A network loaded from a model folder, with its metadata.

    Attributes:
        model: the network, on the CPU, in eval mode.
        metadata: the parsed :data:`METADATA_FILE`.
        model_dir: the folder it was loaded from.
    """

    model: nn.Module
    metadata: dict[str, Any]
    model_dir: Path
    _networks: dict[tuple[str, str, bool], nn.Module] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def network(
        self,
        backend: str = "auto",
        device: str | torch.device = "auto",
        amp: bool | str = "native",
    ) -> nn.Module:
        """The network that runs the windows, compiled once per backend, device and precision.

        :func:`neonb.inference.compile_network` of :attr:`model`: the PyTorch network
        itself, or its OpenVINO compilation (``backend`` ``"auto"`` on the CPU where
        OpenVINO is installed, or ``"openvino"``), kept for the next session of a batch.
        """
        from neonb.inference import compile_network, resolve_device, use_inference_amp

        dev = resolve_device(device)
        key = (backend, str(dev), use_inference_amp(amp, dev))
        if key not in self._networks:
            self._networks[key] = compile_network(
                self.model, patch_size=self.patch_size, backend=backend, device=dev, amp=amp
            )
        return self._networks[key]

    @property
    def channels(self) -> tuple[str, ...]:
        """Input channels in order, e.g. ``("t1w", "t2w")``."""
        return tuple(self.metadata["input_channels"])

    @property
    def images(self) -> str:
        """The kind of T1w/T2w images it was trained on: ``"restore"`` or ``"plain"``."""
        return str(self.metadata.get("input_images", "restore"))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Sliding-window size in voxels."""
        return tuple(int(n) for n in self.metadata["patch_size"])

    @property
    def overlap(self) -> float:
        """Sliding-window overlap in [0, 1)."""
        return float(self.metadata["overlap"])

    @property
    def voxel_size_mm(self) -> tuple[float, float, float]:
        """Voxel size of the training images along the model's axes, in mm."""
        return tuple(float(v) for v in self.metadata["voxel_size_mm"])

    @property
    def orientation(self) -> str:
        """Axis codes of the training images' voxel axes, e.g. ``"RAS"``."""
        return str(self.metadata["orientation"])

    @property
    def labels(self) -> list[int]:
        """The label values the network predicts."""
        return [int(row["index"]) for row in self.metadata["labels"]]

    @property
    def age_head(self) -> dict[str, Any] | None:
        """The age-head settings of an AgeU-Net, ``None`` for a plain segmentation network."""
        return self.metadata.get("age_head")


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def training_grid(data_root: str | os.PathLike, images: str = "restore") -> dict[str, Any]:
    """Voxel size and orientation of the T2w images of a training cohort.

    Reads only the headers of every session's T2w (``neonb.data.read_manifest``).

    Args:
        data_root: a dHCP release (or synthetic cohort) folder.

    Returns:
        ``{"voxel_size_mm": [x, y, z] (median over sessions), "orientation": "RAS" (the most
        common axis codes), "n_sessions": int, "voxel_size_range_mm": [min, max]}``.

    Raises:
        DataError: when the folder is not a release or holds no readable T2w.
    """
    from neonb.data import read_manifest

    root = Path(data_root)
    manifest = read_manifest(root, images=images, progress=False)
    zooms, codes = [], Counter()
    for path in manifest["t2w"]:
        if not path:
            continue
        try:
            header = nib.load(str(path)).header
        except (OSError, ValueError, ImageFileError):  # a broken file tells no grid: skip it
            continue
        affine = header.get_best_affine()  # the voxel size is the affine's, as in segmenting
        sizes = nib.affines.voxel_sizes(affine)[:3]
        if not (np.isfinite(affine).all() and np.all(sizes > 0)):
            continue
        zooms.append([float(z) for z in sizes])
        codes["".join(nib.aff2axcodes(affine))] += 1
    if not zooms:
        raise DataError(root, "holds no readable T2w image to take the voxel size from")
    zooms_array = np.asarray(zooms)
    return {
        "voxel_size_mm": [round(float(v), 6) for v in np.median(zooms_array, axis=0)],
        "orientation": codes.most_common(1)[0][0],
        "n_sessions": len(zooms),
        "voxel_size_range_mm": [float(zooms_array.min()), float(zooms_array.max())],
    }


def _data_description(data_root: Path | None, description: str | None) -> dict[str, Any]:
    """What the network was trained on: the user's words, and the cohort's own description."""
    info: dict[str, Any] = {"description": description or "not recorded"}
    if data_root is None:
        return info
    info["data_root"] = str(Path(data_root).resolve())
    dataset = Path(data_root) / "dataset_description.json"
    if dataset.is_file():
        try:
            described = json.loads(dataset.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(dataset, f"is not readable JSON: {err}") from err
        info["dataset"] = {
            key: described[key]
            for key in ("Name", "DatasetType", "License", "neonb_phantom")
            if key in described
        }
        if description is None and "Name" in described:
            info["description"] = str(described["Name"])
    return info


def _best_metrics(log: pd.DataFrame) -> dict[str, Any]:
    """The log row of the best validation epoch, as plain numbers."""
    scored = log.dropna(subset=["val_dice_nobg"])
    if scored.empty:
        return {"note": "no validation score in log.tsv"}
    best = scored.loc[scored["val_dice_nobg"].idxmax()]
    dice = {
        column.removeprefix("dice_"): float(best[column])
        for column in log.columns
        if column.startswith("dice_") and not math.isnan(float(best[column]))
    }
    return {
        "what": "validation Dice on centre patches at the best epoch (log.tsv)",
        "best_epoch": int(best["epoch"]),
        "epochs_trained": int(log["epoch"].max()),
        "val_dice": float(best["val_dice"]),
        "val_dice_nobg": float(best["val_dice_nobg"]),
        "val_dice_per_class": dice,
        "train_time_s": float(log["epoch_time_s"].sum()),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(path, f"is not readable JSON: {err}") from err


def _load_run(run_dir: Path) -> tuple[nn.Module, pd.DataFrame, Any, dict[str, Any] | None]:
    """The run's model, log, TrainingConfig and, for an AgeU-Net, its age-head settings."""
    if not run_dir.is_dir():
        raise DataError(run_dir, "run folder not found")
    if _is_age_run(run_dir):
        from neonb.ageunet import load_ageunet_run

        run, config, head = load_ageunet_run(run_dir)
        return run.model, run.log, config, head.to_dict()
    from neonb.experiment import load_trained_run

    run, config = load_trained_run(run_dir)
    return run.model, run.log, config, None


def _age_standardisation(model: nn.Module) -> dict[str, float] | None:
    """An AgeU-Net's training-age mean and standard deviation in weeks (also in the weights)."""
    if not hasattr(model, "age_mean"):
        return None
    return {"mean_weeks": float(model.age_mean), "std_weeks": float(model.age_std)}


def _is_age_run(run_dir: Path) -> bool:
    return (run_dir / "age_head.yaml").is_file()


def _run_channels(run_dir: Path, config: Any) -> tuple[str, ...]:
    """The run's input channels: its ``config.yaml``'s ``channels``, or for a run written
    before runs recorded them, the guess from the network's input count
    (:data:`CHANNELS_BY_COUNT`)."""
    from neonb.engine import CONFIG_FILE

    try:
        recorded = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        recorded = None
    if isinstance(recorded, Mapping) and "channels" in recorded:
        return tuple(config.channels)
    n_channels = config.model.in_channels
    if n_channels not in CHANNELS_BY_COUNT:
        raise ConfigError(f"cannot name the {n_channels} input channels of {run_dir}")
    return CHANNELS_BY_COUNT[n_channels]


def _grid(
    data_root: str | os.PathLike | None,
    voxel_size: float | Sequence[float] | None,
    orientation: str | None,
    images: str = "restore",
) -> dict[str, Any]:
    grid: dict[str, Any] = training_grid(data_root, images) if data_root is not None else {}
    if voxel_size is not None:
        grid["voxel_size_mm"] = _as_voxel_size(voxel_size)
    if orientation is not None:
        grid["orientation"] = _as_orientation(orientation)
    missing = [key for key in ("voxel_size_mm", "orientation") if key not in grid]
    if missing:
        raise ConfigError(
            f"the training images' {' and '.join(missing)} are not recorded in a run folder; "
            "give the training data folder (--data-root) or --voxel-size and --orientation"
        )
    return grid


def _as_voxel_size(value: float | Sequence[float]) -> list[float]:
    values = [value] * 3 if isinstance(value, int | float) else list(value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(isinstance(v, int | float) and v > 0 for v in values):
        raise ConfigError(f"voxel_size must be one or three positive mm values, got {value!r}")
    return [float(v) for v in values]


def _as_orientation(value: str) -> str:
    codes = str(value).upper()
    try:
        nib.orientations.axcodes2ornt(tuple(codes))
    except ValueError:
        codes = ""
    if len(codes) != 3 or len(set(codes)) != 3:
        raise ConfigError(
            f"orientation must be three axis codes such as 'RAS' or 'LPI', got {value!r}"
        )
    return codes


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    voxel_size: float | Sequence[float] | None = None,
    orientation: str | None = None,
    description: str | None = None,
    images: str = "restore",
    norms: str | os.PathLike | None = None,
    calibrate_qc: bool | str | os.PathLike = "auto",
    qc_quantile: float = QC_QUANTILE,
    overlap: float | None = None,
    device: str | torch.device = "auto",
    backend: str = "auto",
    progress: bool = False,
) -> Path:
    """Write a finished run as a model folder (:data:`WEIGHTS_FILE` + :data:`METADATA_FILE`).

    A run folder that holds ``age_head.yaml`` is an AgeU-Net run: it is reloaded with
    :func:`neonb.ageunet.load_ageunet_run` and its head settings go into the metadata.
    The input channels are the run's (``channels`` of its ``config.yaml``; a run written
    before runs recorded them is named from its network's input count, 2: T1w and T2w).

    The model's QC threshold is calibrated (:func:`calibrate_qc`) on the run's validation
    sessions, which :func:`neonb.experiment.train_segmentation` records in the run folder
    (:data:`neonb.experiment.VAL_SESSIONS_FILE`): the sessions the model will meet are like
    them, and it was not fitted on them. With ``calibrate_qc="auto"`` a run without that
    file, or whose recorded images are gone, is exported without a threshold and a
    :class:`~neonb.errors.NeonbWarning` says why (:func:`describe_qc` says what was done).

    Args:
        run_dir: a finished run folder (``config.yaml``, ``log.tsv``, ``model_best.pt``).
        out_dir: the model folder to write (created; files of an earlier export replaced).
        data_root: the training data folder, to read the voxel size and orientation of its
            T2w images and its ``dataset_description.json``.
        voxel_size: voxel size of the training images in mm (one value or three); overrides
            what ``data_root`` gives.
        orientation: axis codes of the training images, e.g. ``"RAS"``; overrides
            ``data_root``.
        description: a sentence on the training data (default: the dataset's name).
        images: the kind of T1w/T2w the run was trained on, ``"restore"`` (bias-corrected)
            or ``"plain"`` (:func:`neonb.data.read_manifest`); ``neonb segment --batch`` on
            a release folder reads that kind.
        norms: a tissue-volume TSV (chapter 00's ``tissue_volumes.tsv``,
            :func:`neonb.cohort.tissue_volumes`) to fit the norms on; default: the label
            images of ``data_root`` (:func:`_norm_volumes`). Without either, or with too few
            sessions in ``data_root`` (a warning says so), the folder gets no norms.
        calibrate_qc: ``"auto"`` (default): on the run's validation sessions when it
            recorded them and their images are readable, else not (with a warning);
            ``True``: on them, raising if that fails; ``False``: no QC threshold; a path:
            on the sessions of that manifest TSV or release folder
            (:func:`neonb.segmentation.read_batch`), raising if that fails.
        qc_quantile: quantile of the sessions' QC scores taken as threshold, in (0, 1].
        overlap: the sliding-window overlap the model folder declares, in [0, 1): what
            ``neonb segment`` and the QC calibration use (a QC threshold holds for the overlap
            it was calibrated at). ``None``: the run's (its ``config.overlap``). Without
            overlap a volume needs fewer windows (the demo's 48³ windows on the head boxes of
            its 12 test sessions at 1.5 mm: 8 each, against 8-18, 12 on average, at overlap
            0.25), at some cost in accuracy at the windows' borders.
        device: where the QC calibration runs: ``"auto"``, ``"cpu"``, ``"cuda"``.
        backend: what runs the QC calibration's windows (``neonb segment --backend``).
        progress: show a progress bar while calibrating.

    Returns:
        ``out_dir``.

    Raises:
        DataError: when the run folder is missing, unfinished or unreadable, or (unless
            ``calibrate_qc`` is ``"auto"``) the QC calibration sessions are.
        ConfigError: when the voxel size or orientation is neither given nor derivable,
            the network's input channels cannot be named, ``qc_quantile`` is outside
            (0, 1] or ``overlap`` outside [0, 1).
    """
    from neonb.data import check_image_kind
    from neonb.inference import check_overlap

    check_image_kind(images)
    if calibrate_qc is not False and not 0 < qc_quantile <= 1:
        raise ConfigError(f"qc_quantile must be in (0, 1], got {qc_quantile}")
    if overlap is not None:
        check_overlap(overlap)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    grid = _grid(data_root, voxel_size, orientation, images)
    model, log, config, head = _load_run(run_dir)
    channels = _run_channels(run_dir, config)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "neonb_version": __version__,
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_run": str(run_dir.resolve()),
        "architecture": "AgeUNet" if head is not None else "DynUNet",
        "model": config.model.to_dict(),
        "age_head": head,
        "age_standardisation": _age_standardisation(model),
        "input_channels": list(channels),
        "input_images": images,
        "labels": label_table().to_dict(orient="records")[: config.model.out_channels],
        "patch_size": list(config.patch_size),
        "overlap": config.overlap if overlap is None else float(overlap),
        "normalisation": NORMALISATION,
        "voxel_size_mm": grid["voxel_size_mm"],
        "orientation": grid["orientation"],
        "training_grid": grid,
        "training_data": _data_description(
            Path(data_root) if data_root is not None else None, description
        ),
        "metrics": _best_metrics(log),
        "training_config": config.to_dict(),
        "training_environment": _read_json(run_dir / "environment.json"),
    }
    text = json.dumps(metadata, indent=2, default=_json_default) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: _save_weights(model, tmp))
        atomic_write(out_dir / METADATA_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        _export_norms(out_dir, run_dir, data_root, norms, images)
    except OSError as err:
        raise DataError(out_dir, f"cannot write the model folder: {err}") from err
    _calibrate_at_export(out_dir, run_dir, calibrate_qc, qc_quantile, device, backend, progress)
    return out_dir


def _calibrate_at_export(
    out_dir: Path,
    run_dir: Path,
    calibrate: bool | str | os.PathLike,
    quantile: float,
    device: str | torch.device,
    backend: str,
    progress: bool,
) -> None:
    """The QC calibration of :func:`export_run` (see its ``calibrate_qc``)."""
    from neonb.errors import NeonbWarning
    from neonb.experiment import VAL_SESSIONS_FILE

    if calibrate is False:
        return
    auto = isinstance(calibrate, str) and calibrate == "auto"
    if auto or calibrate is True:
        sessions = run_dir / VAL_SESSIONS_FILE
        if not sessions.is_file():
            problem = f"the run folder records no validation sessions ({sessions} is missing)"
            if not auto:
                raise DataError(sessions, "missing: the run records no validation sessions")
            warnings.warn(
                f"QC threshold not calibrated: {problem}; give --calibrate-qc SESSIONS",
                NeonbWarning,
                stacklevel=3,
            )
            return
    else:
        sessions = Path(calibrate)
    try:
        calibrate_qc(
            out_dir, sessions, quantile=quantile, device=device, backend=backend, progress=progress
        )
    except DataError as err:
        if not auto:
            raise
        warnings.warn(f"QC threshold not calibrated: {err}", NeonbWarning, stacklevel=3)


def write_norms(
    out_dir: str | os.PathLike,
    volumes: pd.DataFrame,
    *,
    source: Mapping[str, Any] | None = None,
    synthetic: bool = False,
    path: str | os.PathLike = "volumes",
) -> Path:
    """Fit tissue-volume norms on ``volumes`` and write them into a model folder.

    Quantile regression of each tissue's volume on scan age (:func:`neonb.norms.fit_norms`),
    saved as ``out_dir/norms.json`` (:func:`neonb.norms.save_norms`), which ``neonb
    segment`` reads to give each volume its centile for the infant's age.

    Args:
        out_dir: the model folder.
        volumes: one row per session and tissue (:func:`neonb.cohort.tissue_volumes`).
        source: where the volumes came from, recorded in the file.
        synthetic: they come from neonb's synthetic cohort (the caveat says so).
        path: the table's name in error messages.

    Returns:
        The path written.

    Raises:
        DataError: naming ``path`` for a table norms cannot be fitted on (missing columns,
            non-numbers, fewer than :data:`neonb.norms.MIN_SESSIONS` sessions).
    """
    from neonb.norms import fit_norms, save_norms

    fitted = fit_norms(volumes, source=source, synthetic=synthetic, path=path)
    return save_norms(fitted, out_dir)


def _norm_volumes(
    run_dir: Path, data_root: Path, images: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tissue volumes of the training cohort's reference labels, and their description.

    Every complete session of ``data_root`` but the test sessions of the study's pipeline
    splits, when the run sits in a study results folder (``RESULTS/CHAPTER/run-i`` beside
    ``RESULTS/splits_pipeline.tsv``). Not the run's training split alone: norms need many
    sessions across the age range (the demo's training split has 18, too few for a 3rd
    centile), and the segmentation network never sees the norms, so more reference labels
    only make the curves steadier; the test sessions stay out so that the study's held-out
    data stay untouched by anything exported with the model.
    """
    from neonb.cohort import complete_sessions, tissue_volumes
    from neonb.data import read_manifest
    from neonb.splits import STUDY_SPLITS, read_splits

    manifest = complete_sessions(read_manifest(data_root, images=images, progress=False))
    sessions = f"every complete session of {data_root}"
    splits_path = run_dir.resolve().parent.parent / STUDY_SPLITS["pipeline"]
    if splits_path.is_file():
        splits = read_splits(splits_path)
        test = splits[splits["split"] == "test"]
        held_out = set(zip(test["participant_id"], test["session_id"], strict=True))
        keys = zip(manifest["participant_id"], manifest["session_id"], strict=True)
        manifest = manifest[[key not in held_out for key in keys]]
        sessions += f" but the test sessions of {splits_path}"
    source = {"data_root": str(data_root.resolve()), "sessions": sessions}
    return tissue_volumes(manifest), source


def _export_norms(
    out_dir: Path,
    run_dir: Path,
    data_root: str | os.PathLike | None,
    norms: str | os.PathLike | None,
    images: str,
) -> None:
    """Write ``norms.json`` from ``norms`` (a TSV) or ``data_root``; remove a stale one."""
    from neonb.data import read_tsv
    from neonb.errors import NeonbWarning
    from neonb.norms import NORMS_FILE

    (out_dir / NORMS_FILE).unlink(missing_ok=True)  # an earlier export's, on other data
    info = _data_description(Path(data_root), None) if data_root is not None else {}
    synthetic = "neonb_phantom" in info.get("dataset", {})
    if norms is not None:
        volumes = read_tsv(Path(norms))
        source = {"volumes": str(Path(norms).resolve()), "sessions": "every row of that table"}
        write_norms(out_dir, volumes, source=source, synthetic=synthetic, path=norms)
        return
    if data_root is None:
        return
    try:
        volumes, source = _norm_volumes(run_dir, Path(data_root), images)
        write_norms(out_dir, volumes, source=source, synthetic=synthetic, path=data_root)
    except DataError as err:
        warnings.warn(f"no norms written into the model folder: {err}", NeonbWarning, stacklevel=3)


def calibrate_qc(
    model_dir: str | os.PathLike,
    sessions: str | os.PathLike,
    *,
    quantile: float = QC_QUANTILE,
    device: str | torch.device = "auto",
    amp: bool | str = "native",
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Calibrate a model folder's QC threshold on sessions it was not trained on.

    Each session is scored as ``neonb segment --tta`` scores it
    (:func:`neonb.segmentation.score_session`: mean normalised entropy of the flip-TTA
    probabilities inside the predicted brain), nothing is written for it, and the
    ``quantile`` of the scores becomes ``qc.threshold`` in :data:`METADATA_FILE`; a
    segmentation scoring above it is flagged. The run's validation sessions are the natural
    choice, as they are like the scans the model will meet but were not fitted:
    :func:`export_run` takes them from the run folder
    (:data:`neonb.experiment.VAL_SESSIONS_FILE`).

    Args:
        model_dir: a model folder written by :func:`export_run`.
        sessions: a manifest TSV or a release folder (:func:`neonb.segmentation.read_batch`)
            with the images of the model's input channels.
        quantile: in (0, 1]; default :data:`QC_QUANTILE`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        amp: bf16 autocast, as in :func:`neonb.segmentation.segment_scan`.
        backend: what runs the windows, as in :func:`neonb.segmentation.segment_scan`
            (the network is compiled once for all sessions).
        progress: show a progress bar.

    Returns:
        The ``qc`` entry written: ``threshold``, ``quantile``, ``n_sessions``, ``scores``
        (``{"sub-<id>_ses-<id>": score}``), ``source``, ``sessions`` (what they are, in
        words, for :func:`describe_qc`), ``measure``.

    Raises:
        ConfigError: for a quantile outside (0, 1].
        DataError: for a bad model folder, source or session, or no session to score.
    """
    from tqdm import tqdm

    from neonb.experiment import VAL_SESSIONS_FILE
    from neonb.segmentation import CHANNEL_NAMES, QC_MEASURE, read_batch, score_session

    if not 0 < quantile <= 1:
        raise ConfigError(f"quantile must be in (0, 1], got {quantile}")
    model_dir = Path(model_dir)
    model = load_exported_model(model_dir)
    table = read_batch(sessions, images=model.images, channels=model.channels)
    scores = {}
    for row in tqdm(
        list(table.itertuples(index=False)), desc="calibrating QC", disable=not progress
    ):
        absent = [CHANNEL_NAMES[key] for key in model.channels if not getattr(row, key)]
        if row.problem or absent:
            problem = row.problem or f"no {' or '.join(absent)} image"
            raise DataError(sessions, f"sub-{row.participant_id} ses-{row.session_id}: {problem}")
        name = f"sub-{row.participant_id}_ses-{row.session_id}"
        scores[name] = score_session(
            model, row.t2w or None, t1w=row.t1w or None, device=device, amp=amp, backend=backend
        )
    finite = [v for v in scores.values() if math.isfinite(v)]
    if not finite:
        raise DataError(sessions, "no session to calibrate the QC threshold on")
    qc = {
        "threshold": float(np.quantile(finite, quantile)),
        "quantile": quantile,
        "n_sessions": len(finite),
        "scores": scores,
        "source": str(Path(sessions).resolve()),
        "sessions": (
            "validation sessions of the run"
            if Path(sessions).name == VAL_SESSIONS_FILE
            else f"sessions of {Path(sessions).resolve()}"
        ),
        "measure": QC_MEASURE,
    }
    write_qc(model_dir, qc)
    return qc


def _ordinal(number: float) -> str:
    """``95`` -> ``"95th"``, ``1`` -> ``"1st"``, ``22`` -> ``"22nd"``, ``97.5`` -> ``"97.5th"``."""
    if number != int(number):
        return f"{number:g}th"
    whole = int(number)
    suffix = "th" if 10 <= whole % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(whole % 10, "th")
    return f"{whole}{suffix}"


def describe_qc(qc: Mapping[str, Any]) -> str:
    """One line on a calibrated QC threshold (the ``qc`` entry of :func:`calibrate_qc`).

    Example:
        >>> describe_qc({"threshold": 0.0123, "quantile": 0.95, "n_sessions": 5,
        ...              "sessions": "validation sessions of the run"})
        'QC threshold 0.0123 from the 5 validation sessions of the run (95th percentile)'
    """
    sessions = qc.get("sessions") or f"sessions of {qc.get('source', 'unknown origin')}"
    percentile = _ordinal(round(float(qc["quantile"]) * 100, 6))
    return (
        f"QC threshold {float(qc['threshold']):.4f} from the {int(qc['n_sessions'])} "
        f"{sessions} ({percentile} percentile)"
    )


def write_qc(model_dir: str | os.PathLike, qc: Mapping[str, Any]) -> Path:
    """Set the ``qc`` entry of a model folder's :data:`METADATA_FILE` (atomically).

    Returns:
        The metadata file.
    """
    path = Path(model_dir) / METADATA_FILE
    metadata = _read_metadata(Path(model_dir))
    metadata["qc"] = dict(qc)
    _check_qc(metadata, path)
    text = json.dumps(metadata, indent=2, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _check_qc(metadata: Mapping[str, Any], path: Path) -> None:
    """Refuse a ``qc`` entry whose threshold is not a number in [0, 1]."""
    qc = metadata.get("qc")
    if qc is None:
        return
    threshold = qc.get("threshold") if isinstance(qc, Mapping) else qc
    if not (_is_number(threshold) and 0 <= threshold <= 1):
        raise _bad_field(path, "qc.threshold", "a number in [0, 1]", threshold)


def _save_weights(model: nn.Module, path: Path) -> None:
    """safetensors file of the model's weights, readable like any other file the user writes."""
    save_model(model.cpu(), str(path), metadata={"format": FORMAT})
    path.chmod(default_file_mode())  # safetensors creates it 0600


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

REQUIRED_METADATA: tuple[str, ...] = (
    "format",
    "format_version",
    "architecture",
    "model",
    "input_channels",
    "labels",
    "patch_size",
    "overlap",
    "voxel_size_mm",
    "orientation",
)
"""Keys :func:`load_exported_model` needs in :data:`METADATA_FILE`."""


def _read_metadata(model_dir: Path) -> dict[str, Any]:
    path = model_dir / METADATA_FILE
    if not path.is_file():
        raise DataError(path, "file not found", hint="is this a folder written by neonb export?")
    metadata = read_json(path, MAX_METADATA_BYTES)
    if not isinstance(metadata, Mapping):
        raise DataError(path, "does not hold a JSON object")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise DataError(path, f"lacks the key(s) {missing}")
    if metadata["format"] != FORMAT:
        raise DataError(path, f"format is {metadata['format']!r}, expected {FORMAT!r}")
    version = metadata["format_version"]
    if not _is_int(version) or version < 1:
        raise DataError(path, f"field 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(
            path,
            f"format_version {version!r} is newer than this neonb reads ({FORMAT_VERSION})",
            hint="upgrade neonb",
        )
    _check_metadata(metadata, path)
    return dict(metadata)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_field(path: Path, name: str, expected: str, value: Any) -> DataError:
    return DataError(path, f"field {name!r} must be {expected}, got {_short(value)}")


def _check_metadata(metadata: Mapping[str, Any], path: Path) -> None:
    """Refuse any field of :data:`METADATA_FILE` of the wrong type or out of range.

    Every check names the field; sizes are bounded (:data:`MAX_LEVELS`,
    :data:`MAX_FILTERS`, :data:`MAX_PATCH_VOXELS`, ...) so that a crafted file cannot make
    neonb allocate more than a real model needs.
    """
    architecture = metadata["architecture"]
    if architecture not in ("DynUNet", "AgeUNet"):
        raise _bad_field(path, "architecture", "'DynUNet' or 'AgeUNet'", architecture)
    if not isinstance(metadata["model"], Mapping):
        raise _bad_field(path, "model", "an object of network settings", metadata["model"])
    _check_network_sizes(metadata["model"], path)
    head = metadata.get("age_head")
    if architecture == "AgeUNet" and not isinstance(head, Mapping):
        raise _bad_field(path, "age_head", "an object of age-head settings for an AgeUNet", head)
    if architecture == "DynUNet" and head is not None:
        raise _bad_field(path, "age_head", "null for a DynUNet (no age head)", head)
    kind = metadata.get("input_images", "restore")
    if kind not in ("restore", "plain"):
        raise _bad_field(path, "input_images", "'restore' or 'plain'", kind)
    channels = metadata["input_channels"]
    if not isinstance(channels, list) or tuple(channels) not in INPUT_CHANNELS:
        choices = " or ".join(json.dumps(list(c)) for c in INPUT_CHANNELS)
        raise _bad_field(path, "input_channels", choices, channels)
    _check_labels(metadata["labels"], path)
    patch = metadata["patch_size"]
    if not (
        isinstance(patch, list)
        and len(patch) == 3
        and all(_is_int(n) and 1 <= n <= MAX_PATCH_VOXELS for n in patch)
    ):
        raise _bad_field(
            path, "patch_size", f"three whole numbers from 1 to {MAX_PATCH_VOXELS}", patch
        )
    overlap = metadata["overlap"]
    if not (_is_number(overlap) and 0 <= overlap < 1):
        raise _bad_field(path, "overlap", "a number in [0, 1)", overlap)
    voxel_size = metadata["voxel_size_mm"]
    if not (
        isinstance(voxel_size, list)
        and len(voxel_size) == 3
        and all(
            _is_number(v) and math.isfinite(v) and 0 < v <= MAX_VOXEL_SIZE_MM for v in voxel_size
        )
    ):
        raise _bad_field(
            path,
            "voxel_size_mm",
            f"three finite sizes in mm, above 0 and at most {MAX_VOXEL_SIZE_MM:g}",
            voxel_size,
        )
    orientation = metadata["orientation"]
    try:
        valid = isinstance(orientation, str) and _as_orientation(orientation) == orientation
    except ConfigError:
        valid = False
    if not valid:
        raise _bad_field(
            path, "orientation", "three axis codes such as 'RAS' or 'LPI'", orientation
        )
    normalisation = metadata.get("normalisation", NORMALISATION)
    if not isinstance(normalisation, Mapping) or any(
        normalisation.get(key) != NORMALISATION[key]
        for key in ("method", "nonzero", "channel_wise")
    ):
        raise _bad_field(
            path,
            "normalisation",
            "neonb's (method 'zscore', nonzero and channel_wise true)",
            normalisation,
        )
    _check_qc(metadata, path)


def _check_network_sizes(model: Mapping[str, Any], path: Path) -> None:
    """Bound the network's size before any layer is built."""
    strides = model.get("strides", [])
    if isinstance(strides, list) and len(strides) > MAX_LEVELS:
        raise _bad_field(path, "model.strides", f"at most {MAX_LEVELS} levels", strides)
    filters = model.get("filters")
    if isinstance(filters, list) and any(_is_number(f) and f > MAX_FILTERS for f in filters):
        raise _bad_field(
            path, "model.filters", f"at most {MAX_FILTERS} feature maps per level", filters
        )
    for name, limit in (("kernel_size", MAX_KERNEL_SIZE), ("strides", MAX_STRIDE)):
        value = model.get(name)
        flat = value if isinstance(value, list) else [value]
        numbers_ = [v for item in flat for v in (item if isinstance(item, list) else [item])]
        if any(_is_number(v) and v > limit for v in numbers_):
            raise _bad_field(path, f"model.{name}", f"at most {limit} per axis", value)


def _check_labels(labels: Any, path: Path) -> None:
    if not isinstance(labels, list) or not labels:
        raise _bad_field(path, "labels", "a non-empty list of labels", labels)
    if len(labels) > MAX_LABELS:
        raise _bad_field(path, "labels", f"at most {MAX_LABELS} labels", f"{len(labels)} labels")
    for i, row in enumerate(labels):
        if not (
            isinstance(row, Mapping)
            and _is_int(row.get("index"))
            and isinstance(row.get("name"), str)
            and isinstance(row.get("abbreviation"), str)
            and isinstance(row.get("color"), str)
            and _COLOUR.match(row["color"])
        ):
            raise _bad_field(
                path,
                f"labels[{i}]",
                "an object with an integer index, a name, an abbreviation and a '#rrggbb' color",
                row,
            )
    indices = [row["index"] for row in labels]
    if indices != list(range(len(labels))):
        raise _bad_field(path, "labels", "indices 0, 1, 2, ... in order", indices)


def _build(metadata: Mapping[str, Any], path: Path) -> nn.Module:
    """The network the (checked) metadata describe, sized on the meta device first."""
    try:
        config = ModelConfig.from_dict(metadata["model"])
        n_channels, n_labels = len(metadata["input_channels"]), len(metadata["labels"])
        if config.in_channels != n_channels:
            raise ConfigError(
                f"model.in_channels is {config.in_channels} but input_channels names {n_channels}"
            )
        if config.out_channels != n_labels:
            raise ConfigError(
                f"model.out_channels is {config.out_channels} but labels lists {n_labels}"
            )
        check_patch_size(tuple(metadata["patch_size"]), config)

        def build() -> nn.Module:
            if metadata["architecture"] == "AgeUNet":
                from neonb.ageunet import AgeHeadConfig, build_ageunet

                return build_ageunet(config, AgeHeadConfig.from_dict(metadata["age_head"]))
            return build_model(config)

        with torch.device("meta"):
            n_parameters = sum(p.numel() for p in build().parameters())
        if n_parameters > MAX_PARAMETERS:
            raise ConfigError(
                f"the network would have {n_parameters} parameters (at most {MAX_PARAMETERS})"
            )
        return build()
    except (ConfigError, TypeError, ValueError) as err:
        raise DataError(path, f"describes an invalid network: {err}") from err


def load_exported_model(model_dir: str | os.PathLike) -> ExportedModel:
    """Rebuild the network of a model folder written by :func:`export_run`.

    Nothing is unpickled: the metadata are JSON and the weights safetensors.

    Args:
        model_dir: the model folder.

    Returns:
        The network (CPU, eval mode) with its metadata.

    Raises:
        DataError: naming the file when the folder, the metadata or the weights are missing,
            unreadable, not in the expected format (a pickle is refused here), or do not fit
            the network the metadata describe.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(model_dir, "model folder not found", hint="write one with neonb export")
    metadata = _read_metadata(model_dir)
    model = _build(metadata, model_dir / METADATA_FILE)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(weights, "file not found")
    try:
        load_model(model, weights, strict=True, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(weights, f"is not a safetensors weights file ({err})") from err
    except RuntimeError as err:
        raise DataError(
            weights, f"does not fit the network described in {METADATA_FILE} ({err})"
        ) from err
    model.eval()
    return ExportedModel(model, metadata, model_dir)
