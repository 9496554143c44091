"""Segment a researcher's own neonatal scans with an exported model, one or a batch.

This is what ``neonb segment`` does (:mod:`neonb.cli`). For one session,
:func:`segment_scan`

1. opens and checks every input (:func:`load_inputs`): each image with
   :func:`neonb.data.load_nifti` (missing file, not a regular file, not NIfTI, corrupt gzip,
   truncated, too large for its header's size limits, a non-finite or singular affine),
   :func:`~neonb.data.check_image_3d`, :func:`check_min_size`,
   :func:`~neonb.data.check_finite` (NaN/Inf, or beyond the float32 range) and
   :func:`check_not_blank`; T1w against T2w with :func:`~neonb.data.check_same_shape` and
   :func:`~neonb.data.check_same_affine`; a reference segmentation, when one is given for
   evaluation, with :func:`~neonb.data.check_labels`. Header fields that disagree with the
   affine (:func:`~neonb.data.geometry_warnings`) are warned about
   (:class:`~neonb.errors.NeonbWarning`); the affine is the one source of the voxel size.
   No planned output may replace an input (:func:`check_no_input_replaced`). Any problem
   raises :class:`~neonb.errors.DataError` naming the file, before anything is written;
2. reorients the images to the voxel-axis orientation the model was trained on (lossless:
   axes are permuted and flipped with :mod:`nibabel.orientations`) and, when the voxel size
   differs from the model's, resamples them to it (MONAI ``Spacing``, bilinear) and says so;
3. pre-processes the image with the training's own function
   (:func:`neonb.transforms.preprocessing_transforms`, uncropped: each channel z-normalised
   over its non-zero voxels; :func:`prepare_image`), and segments by sliding windows inside
   the head's bounding box (:func:`neonb.inference.segment`, the study's inference path;
   an AgeU-Net also predicts the scan age from the same windows, as
   :func:`neonb.ageunet.segment_with_age`);
4. maps the result back onto the input's own voxel grid: when resampled, the class
   probabilities by linear interpolation, labelled by their argmax there (as nnU-Net;
   :func:`from_model_grid_probabilities`), then the inverse reorientation; and writes, with
   BIDS-derivative names derived from the input's (:func:`output_prefix`), e.g. for
   ``sub-1_ses-2_desc-restore_T2w.nii.gz``::

       sub-1_ses-2_desc-neonb_dseg.nii.gz   uint8 labels, the input's affine and header
       sub-1_ses-2_desc-neonb_dseg.tsv      the label table (BIDS dseg.tsv)
       sub-1_ses-2_desc-neonb_dseg.json     sidecar: sources, model, what was resampled
       sub-1_ses-2_desc-neonb_volumes.tsv   volume of every class in mL (and its centile)
       sub-1_ses-2_desc-neonb_age.tsv       predicted scan age (AgeU-Net models only)
       sub-1_ses-2_desc-neonb_dice.tsv      Dice against a reference (when one is given)
       sub-1_ses-2_desc-neonb_norms.png     the volumes on the model's norm curves
       sub-1_ses-2_desc-neonb_uncertainty.nii.gz  float32 uncertainty map (``--tta`` only)
       sub-1_ses-2_desc-neonb_qc.png        tri-planar overlay for a visual check

   When the model folder has norms (:data:`neonb.norms.NORMS_FILE`, written by
   ``neonb export``) and the scan age is known (``--scan-age``, or a batch's ``scan_age``),
   ``volumes.tsv`` gives each tissue its ``centile`` for that age and the norms' median
   (``norm_median_ml``), with a ``norm_note`` where no centile is given (an age outside the
   norms' range: nothing is extrapolated), and the norms picture is written; the sidecar
   carries the norms' caveat (:mod:`neonb.norms`: norms of a training cohort, let alone a
   synthetic one, are not clinical norms). Without norms or age, neither is there.

   With ``tta`` (``neonb segment --tta``) the network runs on the image and on its flips
   along every combination of the training's flip axes (:func:`tta_flips`: 8 passes), the
   probabilities are averaged, and the uncertainty map is their entropy divided by ln(C)
   (0: certain, 1: every class equally likely); its mean over the voxels labelled brain is
   the session's QC score (:func:`qc_score`), flagged above the threshold calibrated at export
   (:func:`qc_threshold`, :func:`neonb.export.calibrate_qc`). Both go into the sidecar and,
   in a batch, into ``segment_batch.tsv``. Without ``tta`` nothing of this is computed and the
   network runs once.

   Every file goes through :func:`neonb.files.atomic_write`; the segmentation is written
   last, and if any write fails the files already written are removed, so a session has
   all its outputs or none. A result with no brain labelled (every voxel background) is
   refused and nothing is written; a refusal leaves no empty output folder.

:func:`segment_batch` runs this over a manifest TSV or a dHCP/BIDS folder with a progress
bar, skips sessions whose outputs all exist (so an interrupted batch resumes where it
stopped), overlaps reading the next session and writing the last one with the network's
work on the current one, and reports a failing session without stopping the others (a participant or
session id that is not a BIDS label fails its session, and no folder is made from it). A
lock file in the output folder (:data:`BATCH_LOCK_FILE`) refuses a second batch into it.

Example:
    >>> from neonb.export import load_exported_model
    >>> model = load_exported_model("models/demo")  # doctest: +SKIP
    >>> result = segment_scan(model, "sub-1_ses-2_T2w.nii.gz", "out",
    ...                       t1w="sub-1_ses-2_T1w.nii.gz")  # doctest: +SKIP
    >>> result.volumes[["abbreviation", "volume_ml"]]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample
from nibabel import orientations
from nibabel.spatialimages import SpatialImage
from tqdm import tqdm

from neonb import __version__
from neonb.data import (
    MAX_IMAGE_VOXELS,
    check_finite,
    check_image_3d,
    check_labels,
    check_same_affine,
    check_same_shape,
    geometry_warnings,
    load_nifti,
    normalise_participant_id,
    normalise_session_id,
    read_manifest,
    read_tsv,
    require_columns,
)
from neonb.errors import ConfigError, DataError, NeonbError, NeonbWarning
from neonb.export import METADATA_FILE, WEIGHTS_FILE, ExportedModel, load_exported_model
from neonb.files import atomic_write, exclusive_lock, temporary_name
from neonb.inference import (
    backend_name,
    class_indices,
    default_sw_batch_size,
    flip_combinations,
    normalised_entropy,
    predict_foreground,
    resolve_device,
    save_segmentation,
    use_inference_amp,
)
from neonb.labels import DRAWEM9
from neonb.metrics import class_column, dice_per_class, volumes_ml
from neonb.models import reference_channel
from neonb.norms import NORMS_FILE, Norms, load_norms, plot_norms
from neonb.transforms import preprocessing_transforms

__all__ = [
    "BATCH_COLUMNS",
    "BATCH_LOCK_FILE",
    "BATCH_SUMMARY_FILE",
    "MIN_AXIS_VOXELS",
    "OUTPUT_DESC",
    "BatchResult",
    "GridMapping",
    "SegmentationResult",
    "check_min_size",
    "check_no_input_replaced",
    "check_not_blank",
    "from_model_grid",
    "from_model_grid_map",
    "from_model_grid_probabilities",
    "flagged_sessions",
    "gather_tables",
    "load_inputs",
    "output_paths",
    "output_prefix",
    "plan_grid",
    "prepare_image",
    "qc_flag",
    "qc_score",
    "qc_threshold",
    "save_map",
    "score_session",
    "save_qc_png",
    "read_batch",
    "segment_batch",
    "segment_scan",
    "to_model_grid",
    "tta_flips",
]

OUTPUT_DESC = "neonb"
"""The ``desc-`` entity of every output."""

DROPPED_ENTITIES: frozenset[str] = frozenset({"desc", "space"})
"""Entities of the input name that describe the input, not the derivative."""

CHANNEL_NAMES: dict[str, str] = {"t1w": "T1w", "t2w": "T2w"}
CHANNEL_OPTIONS: dict[str, str] = {"t1w": "--t1", "t2w": "--t2"}

VOXEL_SIZE_ATOL_MM = 1e-3
"""Voxel sizes closer than this (mm) count as equal: no resampling."""

BATCH_COLUMNS: tuple[str, ...] = ("participant_id", "session_id", "scan_age")
"""Columns every batch manifest TSV needs, besides one per input channel of the model
(``t2w``, ``t1w``: :func:`read_batch`); ``dseg`` is optional."""

BATCH_SUMMARY_FILE = "segment_batch.tsv"
"""Per-session status of the last batch, written into the output folder."""

BATCH_LOCK_FILE = ".neonb-segment-batch.lock"
"""Held in the output folder while a batch runs (:func:`neonb.files.exclusive_lock`), so a
second batch into the same folder is refused rather than doing all the work twice."""

DATASET_DESCRIPTION_FILE = "dataset_description.json"

MIN_AXIS_VOXELS = 4
"""Fewest voxels along any axis of an input: fewer is a slice or a point, not a 3D scan."""

BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")
"""A BIDS label (the value of ``sub-`` and ``ses-``): letters and digits only."""

BATCH_TABLES: dict[str, tuple[str, str]] = {
    "volumes": ("volumes.tsv", "volume_ml_"),
    "dice": ("dice.tsv", "dice_"),
}
"""Per-session tables gathered into one row per session at the top of a batch's output:
output kind -> (file name, column prefix of each class)."""

QC_DPI = 100
"""Resolution of the QC image (nilearn's tri-planar figure is about 7 × 2.6 inches)."""

QC_ALPHA = 0.45
"""Opacity of the label colours over the T2w in the QC image."""

_ENTITY = re.compile(r"^[A-Za-z0-9]+-[A-Za-z0-9]+$")
_MISSING_TEXT = frozenset({"", "n/a", "na", "nan", "none", "null"})


# --------------------------------------------------------------------------------------
# Output names
# --------------------------------------------------------------------------------------


def _strip_nifti_extension(name: str) -> str:
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def output_prefix(path: str | os.PathLike) -> str:
    """The entities of an input file name that its derivatives keep.

    A BIDS name keeps its ``key-value`` entities but ``desc`` and ``space``, and loses its
    suffix; any other name keeps its stem (characters other than letters, digits, ``-`` and
    ``_`` are dropped).

    Example:
        >>> output_prefix("sub-CC1_ses-7_desc-restore_T2w.nii.gz")
        'sub-CC1_ses-7'
        >>> output_prefix("baby T2.nii")
        'babyT2'
    """
    stem = _strip_nifti_extension(Path(path).name)
    parts = stem.split("_")
    if parts[0].startswith("sub-") and _ENTITY.match(parts[0]):
        kept = [
            part
            for part in parts
            if _ENTITY.match(part) and part.split("-", 1)[0] not in DROPPED_ENTITIES
        ]
        return "_".join(kept)
    return re.sub(r"[^A-Za-z0-9_-]", "", stem) or "scan"


def output_paths(
    out_dir: str | os.PathLike,
    prefix: str,
    *,
    age: bool = False,
    dice: bool = False,
    norms: bool = False,
    uncertainty: bool = False,
) -> dict[str, Path]:
    """Paths of every output of one session, the segmentation last.

    Args:
        out_dir: the session's output folder.
        prefix: e.g. ``"sub-1_ses-2"`` (:func:`output_prefix`).
        age: include the predicted-age table (AgeU-Net models).
        dice: include the Dice table (evaluation against a reference).
        norms: include the picture of the volumes on the norm curves (a model with norms
            and a known scan age, :func:`_norms_wanted`).
        uncertainty: include the uncertainty map (``--tta``).

    Returns:
        ``{"dseg_tsv", "sidecar", "volumes", ["age",] ["dice",] ["norms",] ["uncertainty",]
        "qc", "dseg"}`` -> path.
    """
    base = Path(out_dir) / f"{prefix}_desc-{OUTPUT_DESC}"
    paths = {
        "dseg_tsv": Path(f"{base}_dseg.tsv"),
        "sidecar": Path(f"{base}_dseg.json"),
        "volumes": Path(f"{base}_volumes.tsv"),
    }
    if age:
        paths["age"] = Path(f"{base}_age.tsv")
    if dice:
        paths["dice"] = Path(f"{base}_dice.tsv")
    if norms:
        paths["norms"] = Path(f"{base}_norms.png")
    if uncertainty:
        paths["uncertainty"] = Path(f"{base}_uncertainty.nii.gz")
    paths["qc"] = Path(f"{base}_qc.png")
    paths["dseg"] = Path(f"{base}_dseg.nii.gz")
    return paths


# --------------------------------------------------------------------------------------
# Reading and checking the inputs
# --------------------------------------------------------------------------------------


def check_not_blank(image: SpatialImage) -> None:
    """Raise when every voxel of an intensity image is zero.

    Raises:
        DataError: naming the image's file.
    """
    if not np.any(np.asanyarray(image.dataobj)):
        name = image.get_filename() or "<in-memory image>"
        raise DataError(name, "all voxels are zero: the image is empty")


def check_min_size(image: SpatialImage) -> None:
    """Raise when an axis has fewer than :data:`MIN_AXIS_VOXELS` voxels.

    Raises:
        DataError: naming the image's file and its shape.
    """
    shape = tuple(int(n) for n in image.shape)
    if min(shape) < MIN_AXIS_VOXELS:
        name = image.get_filename() or "<in-memory image>"
        raise DataError(
            name,
            f"has shape {shape}: fewer than {MIN_AXIS_VOXELS} voxels along an axis, "
            "not a 3D scan to segment",
        )


def _load_intensity_image(path: str | os.PathLike) -> nib.Nifti1Image:
    image = load_nifti(path)
    check_image_3d(image)
    check_min_size(image)
    check_finite(image)
    check_not_blank(image)
    return image


def load_inputs(
    paths: Mapping[str, str | os.PathLike | None],
    channels: Sequence[str],
    *,
    model_name: str = "the model",
    reference: str | os.PathLike | None = None,
    labels: Sequence[int] = tuple(DRAWEM9),
) -> tuple[dict[str, nib.Nifti1Image], nib.Nifti1Image | None]:
    """Open and check the images of one session; raise on the first problem.

    Args:
        paths: ``{"t2w": path or None, "t1w": path or None}``.
        channels: the model's input channels in order, e.g. ``("t1w", "t2w")``.
        model_name: how to name the model in the message for a missing modality.
        reference: optionally, a segmentation to evaluate against.
        labels: the label values a reference may hold.

    Returns:
        The images of ``channels`` (3D, finite, not blank, on the grid of the anchor image,
        :func:`neonb.models.reference_channel`: the T2w, or a T1w-only model's T1w) and the
        reference (or ``None``).

    Raises:
        DataError: naming the file: missing, not a regular file, not NIfTI, corrupt gzip,
            truncated, too large, a non-finite or singular affine, not 3D, smaller than
            :data:`MIN_AXIS_VOXELS` along an axis, complex, NaN/Inf voxels (or beyond the
            float32 range), all zero, shape or affine different from the T2w's, labels
            outside ``labels``; or, naming an image given (or the model), a modality the
            model needs is missing.
    """
    given = {key: Path(value) for key, value in paths.items() if value}
    missing = [key for key in channels if key not in given]
    if missing:
        named = next(iter(given.values()), Path(model_name))
        needed = " and ".join(CHANNEL_NAMES[key] for key in channels)
        options = " ".join(f"{CHANNEL_OPTIONS[key]} FILE" for key in missing)
        raise DataError(
            named,
            f"{model_name} needs {needed} inputs, but no "
            f"{' or '.join(CHANNEL_NAMES[key] for key in missing)} was given",
            hint=f"add {options}",
        )
    images = {key: _load_intensity_image(given[key]) for key in channels}
    anchor = images[reference_channel(channels)]
    for image in images.values():
        if image is not anchor:
            check_same_shape(image, anchor)
            check_same_affine(image, anchor)
    reference_image = None
    if reference is not None:
        reference_image = load_nifti(reference)
        check_image_3d(reference_image)
        check_labels(reference_image, labels)
        check_same_shape(reference_image, anchor)
        check_same_affine(reference_image, anchor)
    return images, reference_image


# --------------------------------------------------------------------------------------
# The model's grid
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridMapping:
    """How an input's voxel grid maps onto the model's, and back.

    Attributes:
        shape: the input's shape ``(X, Y, Z)``.
        affine: the input's voxel-to-world affine (4 x 4).
        orientation: the input's axis codes, e.g. ``"LPS"``.
        transform: the :mod:`nibabel.orientations` transform to the model's orientation.
        reoriented_shape: the shape after reorientation.
        reoriented_affine: the affine after reorientation (the same world positions).
        voxel_size_mm: the input's voxel size along the model's axes.
        target_voxel_size_mm: the model's voxel size; ``None`` when equal (no resampling).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    orientation: str
    transform: np.ndarray
    reoriented_shape: tuple[int, int, int]
    reoriented_affine: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    target_voxel_size_mm: tuple[float, float, float] | None

    @property
    def reoriented(self) -> bool:
        """Whether the axes are permuted or flipped."""
        identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        return not np.array_equal(self.transform, identity)

    @property
    def resampled(self) -> bool:
        """Whether the image is resampled to another voxel size."""
        return self.target_voxel_size_mm is not None


def plan_grid(image: SpatialImage, orientation: str, voxel_size_mm: Sequence[float]) -> GridMapping:
    """How to bring ``image`` onto the model's orientation and voxel size.

    Args:
        image: a 3D input image.
        orientation: the model's axis codes, e.g. ``"RAS"``.
        voxel_size_mm: the model's voxel size along its axes, mm.
    """
    shape = tuple(int(n) for n in image.shape[:3])
    affine = np.asarray(image.affine, dtype=float)
    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(tuple(orientation)))
    reoriented_affine = affine @ orientations.inv_ornt_aff(transform, shape)
    reoriented_shape = tuple(int(shape[int(axis)]) for axis in np.argsort(transform[:, 0]))
    zooms = tuple(float(z) for z in np.sqrt((reoriented_affine[:3, :3] ** 2).sum(axis=0)))
    target = tuple(float(v) for v in voxel_size_mm)
    same = np.allclose(zooms, target, rtol=0, atol=VOXEL_SIZE_ATOL_MM)
    if not same:
        resampled = math.prod(
            math.ceil(n * z / t) for n, z, t in zip(reoriented_shape, zooms, target, strict=True)
        )
        if resampled > MAX_IMAGE_VOXELS:
            raise DataError(
                image.get_filename() or "<in-memory image>",
                f"resampling its {_fmt_mm(zooms)} voxels to the model's {_fmt_mm(target)} "
                f"would make {resampled} voxels (at most {MAX_IMAGE_VOXELS})",
            )
    return GridMapping(
        shape=shape,
        affine=affine,
        orientation="".join(orientations.aff2axcodes(affine)),
        transform=transform,
        reoriented_shape=reoriented_shape,
        reoriented_affine=reoriented_affine,
        voxel_size_mm=zooms,
        target_voxel_size_mm=None if same else target,
    )


def to_model_grid(volumes: Sequence[np.ndarray], mapping: GridMapping) -> MetaTensor:
    """Stack input volumes as channels on the model's grid.

    Args:
        volumes: arrays of shape ``mapping.shape``, one per channel, in the model's order.
        mapping: from :func:`plan_grid`.

    Returns:
        ``(C, X', Y', Z')`` float32, reoriented and, when needed, resampled (bilinear), with
        its affine. Voxels outside the head (zero in every channel) stay zero: the non-zero
        mask is resampled by nearest neighbour and applied after the bilinear resampling,
        so that interpolation does not blur the head's edge into the background, which the
        network never saw in training (masked images, z-scored over non-zero voxels).
    """
    stacked = np.stack(
        [
            orientations.apply_orientation(np.asarray(v, np.float32), mapping.transform)
            for v in volumes
        ]
    )
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(stacked)), affine=mapping.reoriented_affine
    )
    if mapping.resampled:
        spacing = mapping.target_voxel_size_mm
        head = (image != 0).any(dim=0, keepdim=True).to(torch.float32)
        image = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros")(image)
        head = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros")(head)
        image = image * (head > 0)  # keep the head's edge sharp: zeros stay zeros
    return image


def from_model_grid(
    labels: np.ndarray, model_affine: np.ndarray | torch.Tensor, mapping: GridMapping
) -> np.ndarray:
    """Bring labels predicted on the model's grid back onto the input's voxels.

    ``neonb segment`` maps the class probabilities back instead, when it resamples
    (:func:`from_model_grid_probabilities`); this is for a label map alone.

    Args:
        labels: ``(X', Y', Z')`` labels on the grid :func:`to_model_grid` returned.
        model_affine: that grid's affine.
        mapping: from :func:`plan_grid`.

    Returns:
        ``(X, Y, Z)`` uint8 labels on the input's grid (nearest neighbour when resampled).
    """
    data = np.asarray(labels)
    if mapping.resampled:
        back = _resample_back(
            torch.from_numpy(data.astype(np.float32)), model_affine, mapping, "nearest"
        )
        data = np.rint(back).astype(np.uint8)
    return _reorient_back(data, mapping).astype(np.uint8)


def from_model_grid_probabilities(
    probs: torch.Tensor,
    model_affine: np.ndarray | torch.Tensor,
    mapping: GridMapping,
    *,
    box: Sequence[slice] | None = None,
    model_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Labels on the input's voxels from class probabilities on the model's grid.

    Each class's probability map is resampled onto the input's grid by linear
    interpolation and the label is the argmax there, as nnU-Net does, rather than the
    labels resampled by nearest neighbour (:func:`from_model_grid`): a boundary then falls
    where the interpolated probabilities cross, between the model's voxels, not on them.
    The input's grid is done a slab at a time (:data:`RESAMPLE_SLAB_VOXELS`), so memory holds
    the ``C`` probabilities of one slab, not of the whole input grid (10 classes of a
    217 x 290 x 290 grid would take 0.7 GB); on the model's grid only the head's box is kept.

    Args:
        probs: ``(C, ...)`` probabilities on the model's grid, or inside ``box`` of it.
        model_affine: the model grid's affine (:func:`to_model_grid`).
        mapping: from :func:`plan_grid`.
        box: where ``probs`` lie in the model grid (:func:`neonb.inference.predict_foreground`);
            outside it every voxel is class 0 (background) with probability 1.
        model_shape: the model grid's spatial shape; required with ``box``.

    Returns:
        ``(X, Y, Z)`` uint8 labels on the input's grid (class 0 outside the model's grid).
    """
    if not mapping.resampled:
        labels = class_indices(probs.float()).to(torch.uint8)
        if box is not None:
            full = torch.zeros(tuple(int(n) for n in model_shape), dtype=torch.uint8)
            full[tuple(box)] = labels
            labels = full
        return _reorient_back(labels.numpy(), mapping).astype(np.uint8)
    shape = tuple(int(n) for n in (model_shape if box is not None else probs.shape[1:]))
    box = tuple(box) if box is not None else tuple(slice(0, n) for n in shape)
    # One voxel of certain background around the box (where the model's grid has room), so
    # interpolation across the box's faces sees what lies outside it.
    padded = tuple(
        slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, shape, strict=True)
    )
    inner = tuple(
        slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, padded, strict=True)
    )
    source = torch.zeros((probs.shape[0], *(p.stop - p.start for p in padded)))
    source[0] = 1.0
    source[(slice(None), *inner)] = probs.float()
    voxel_to_source = np.linalg.inv(np.asarray(model_affine, float)) @ mapping.reoriented_affine
    voxel_to_source[:3, 3] -= [p.start for p in padded]
    out_shape = mapping.reoriented_shape
    labels = np.zeros(out_shape, np.uint8)
    # Only the input voxels that fall within a voxel of the source can be labelled.
    corners = np.array(list(itertools.product(*[(-1, n) for n in source.shape[1:]])), float)
    inside = nib.affines.apply_affine(np.linalg.inv(voxel_to_source), corners)
    low = np.clip(np.floor(inside.min(0)).astype(int), 0, out_shape)
    high = np.clip(np.ceil(inside.max(0)).astype(int) + 1, 0, out_shape)
    if np.any(high <= low):
        return _reorient_back(labels, mapping).astype(np.uint8)
    ranges = [(int(a), int(b)) for a, b in zip(low, high, strict=True)]
    rows = max(1, RESAMPLE_SLAB_VOXELS // math.prod(b - a for a, b in ranges[1:]))
    for first in range(ranges[0][0], ranges[0][1], rows):
        slab = [(first, min(first + rows, ranges[0][1])), *ranges[1:]]
        value, index = _sample_back(source, voxel_to_source, slab).max(dim=0)
        index[value <= 0] = 0  # outside the model's grid: background
        labels[tuple(slice(a, b) for a, b in slab)] = index.to(torch.uint8).numpy()
    return _reorient_back(labels, mapping).astype(np.uint8)


RESAMPLE_SLAB_VOXELS = 2**21
"""Input-grid voxels mapped back at once by :func:`from_model_grid_probabilities`: the
probabilities of a slab of them take ``C`` x 8 MiB (80 MiB for the ten drawem9 classes)."""


def _sample_back(
    source: torch.Tensor, voxel_to_source: np.ndarray, slab: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """``(C, *slab)``: ``source`` (``(C, X, Y, Z)``) interpolated linearly at the source
    positions of the output voxels in ``slab``, 0 beyond the source's voxels.

    When the grids' axes are parallel (``voxel_to_source`` diagonal but for its offsets: a
    change of voxel size, the usual case) the trilinear interpolation is done one axis at a
    time, which is several times faster than gathering the eight corners of every output
    voxel; otherwise :func:`torch.nn.functional.grid_sample` gathers them. Both weigh the
    same corners by the same products of per-axis weights (a corner outside the source
    counts 0), so they differ by float rounding only.
    """
    linear = np.asarray(voxel_to_source, float)[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-9:
        grid = _sampling_grid(voxel_to_source, slab, source.shape[1:])
        return torch.nn.functional.grid_sample(
            source[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )[0]
    out = source
    for axis, (start, stop) in enumerate(slab):
        position = torch.arange(start, stop, dtype=torch.float64) * float(
            voxel_to_source[axis, axis]
        ) + float(voxel_to_source[axis, 3])
        n, dim = int(source.shape[1 + axis]), 1 + axis
        low = torch.floor(position)
        high_weight = (position - low).to(torch.float32)
        low = low.to(torch.int64)
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        weights = [
            torch.where((index >= 0) & (index < n), weight, 0.0).view(shape)
            for index, weight in ((low, 1.0 - high_weight), (low + 1, high_weight))
        ]
        below = out.index_select(dim, low.clamp(0, n - 1)).mul_(weights[0])
        out = below.addcmul_(out.index_select(dim, (low + 1).clamp(0, n - 1)), weights[1])
    return out


def _sampling_grid(
    voxel_to_source: np.ndarray, ranges: Sequence[tuple[int, int]], source_shape: Sequence[int]
) -> torch.Tensor:
    """:func:`torch.nn.functional.grid_sample`'s grid for the output voxels in ``ranges``
    (``[start, stop)`` per axis): each one's position in the source, in [-1, 1] (corners
    aligned), last axis ordered (z, y, x) as grid_sample wants."""
    axes = [torch.arange(a, b, dtype=torch.float32) for a, b in ranges]
    matrix = torch.from_numpy(voxel_to_source).to(torch.float32)
    coords = []
    for axis in range(3):
        scale = 2 / max(int(source_shape[axis]) - 1, 1)
        row = matrix[axis] * scale
        position = (
            (row[0] * axes[0])[:, None, None]
            + (row[1] * axes[1])[None, :, None]
            + (row[2] * axes[2])[None, None, :]
            + (row[3] - 1)
        )
        coords.append(position)
    return torch.stack(coords[::-1], dim=-1)


def from_model_grid_map(
    values: torch.Tensor | np.ndarray, model_affine: np.ndarray | torch.Tensor, mapping: GridMapping
) -> np.ndarray:
    """A continuous map ``(X', Y', Z')`` on the model's grid onto the input's voxels.

    Linear interpolation when resampled (0 outside the model's grid), then the inverse
    reorientation; float32, shape ``(X, Y, Z)``.
    """
    data = torch.as_tensor(np.asarray(values, np.float32))
    out = (
        _resample_back(data, model_affine, mapping, "bilinear")
        if mapping.resampled
        else data.numpy()
    )
    return _reorient_back(np.asarray(out, np.float32), mapping)


def _resample_back(
    volume: torch.Tensor, model_affine: np.ndarray | torch.Tensor, mapping: GridMapping, mode: str
) -> np.ndarray:
    """One ``(X', Y', Z')`` volume from the model's grid onto the reoriented input grid."""
    tensor = MetaTensor(volume[None], affine=torch.as_tensor(model_affine))
    back = SpatialResample(mode=mode, padding_mode="zeros")(
        tensor,
        dst_affine=torch.from_numpy(mapping.reoriented_affine),
        spatial_size=mapping.reoriented_shape,
    )
    return np.asarray(back.as_tensor()[0])


def _reorient_back(data: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """Undo :func:`to_model_grid`'s reorientation: the input's own voxel axes."""
    inverse = orientations.ornt_transform(
        orientations.axcodes2ornt(_axcodes_after(mapping)),
        orientations.io_orientation(mapping.affine),
    )
    return np.ascontiguousarray(orientations.apply_orientation(data, inverse))


def _axcodes_after(mapping: GridMapping) -> tuple[str, ...]:
    return orientations.aff2axcodes(mapping.reoriented_affine)


# --------------------------------------------------------------------------------------
# One session
# --------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """What :func:`segment_scan` wrote and found.

    Attributes:
        outputs: output kind -> path (see :func:`output_paths`).
        volumes: one row per class: ``index``, ``name``, ``abbreviation``, ``volume_ml``.
        ages: predicted scan age in weeks (``"mean"``, ``"foreground_weighted"``), or
            ``None`` for a model without an age head.
        dice: Dice per class against the reference, or ``None``.
        notes: what was done to fit the model (reorientation, resampling), as sentences.
        warnings: header fields of the inputs that disagree with the affine used
            (:func:`neonb.data.geometry_warnings`), each naming its file; each was also
            issued as a :class:`~neonb.errors.NeonbWarning`.
        inference_s: seconds of network inference.
        seconds: seconds for the whole session.
        qc_uncertainty: with TTA, the mean normalised entropy inside the predicted brain
            (:func:`qc_score`); ``None`` without.
        qc_flag: whether ``qc_uncertainty`` is above the model's threshold
            (:func:`qc_threshold`); ``None`` without TTA or without a calibrated threshold.
    """

    outputs: dict[str, Path]
    volumes: pd.DataFrame
    ages: dict[str, float] | None = None
    dice: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inference_s: float = math.nan
    seconds: float = math.nan
    qc_uncertainty: float | None = None
    qc_flag: bool | None = None


def _prepare_out_dir(out_dir: Path) -> list[Path]:
    """Create ``out_dir``, make sure a file can be written in it, and return the folders
    created (outermost first), for :func:`_remove_created` to take back on a refusal."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output folder is a file, not a folder")
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()][::-1]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir, prefix=".neonb-write-test-"):
            pass
    except OSError as err:
        _remove_created(created)
        raise DataError(out_dir, f"output folder is not writable: {err.strerror or err}") from err
    return created


def _remove_created(created: Sequence[Path]) -> None:
    """Remove the folders :func:`_prepare_out_dir` created, innermost first, while empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def _file_identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """The real path (links resolved) and, for an existing file, its device and inode."""
    try:
        status = os.stat(path)
        inode = (status.st_dev, status.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def check_no_input_replaced(
    inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike]
) -> None:
    """Raise when writing ``outputs`` (or their temporary names) would replace an input.

    Paths are compared after resolving symbolic links, and existing files by device and
    inode too, so a link or a hard link to an input counts as the input.

    Raises:
        DataError: naming the input and the output that would replace it.
    """
    known = [(Path(path), *_file_identity(Path(path))) for path in inputs if path]
    for output in outputs:
        for target in (Path(output), temporary_name(output)):
            real, inode = _file_identity(target)
            for source, source_real, source_inode in known:
                if real == source_real or (inode is not None and inode == source_inode):
                    raise DataError(
                        source,
                        f"is an input, and the output {target} would replace it",
                        hint="write to another --out folder, or rename the input",
                    )


def _model_files(model: ExportedModel) -> list[Path]:
    return [model.model_dir / METADATA_FILE, model.model_dir / WEIGHTS_FILE]


def _brain_labels(model: ExportedModel) -> list[int]:
    """The label values that are brain: not background (0, or marked ``background``)."""
    return [
        int(row["index"])
        for row in model.metadata["labels"]
        if not row.get("background", int(row["index"]) == 0)
    ]


def _check_device(device: str | torch.device) -> None:
    """Refuse a CUDA device on a machine without one, before any work is done."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but no CUDA GPU is available")


def _as_model(model: ExportedModel | str | os.PathLike) -> ExportedModel:
    return model if isinstance(model, ExportedModel) else load_exported_model(model)


def _fmt_mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values) + " mm"


def _notes(mapping: GridMapping, model: ExportedModel, passes: int = 1) -> list[str]:
    notes = []
    if mapping.reoriented:
        notes.append(
            f"reoriented from {mapping.orientation} to the model's {model.orientation} and back"
        )
    if mapping.resampled:
        notes.append(
            f"resampled from {_fmt_mm(mapping.voxel_size_mm)} voxels to the model's "
            f"{_fmt_mm(model.voxel_size_mm)} (bilinear) and the class probabilities back to "
            "the input's grid (linear), labelled by their argmax there"
        )
    if passes > 1:
        notes.append(f"flip test-time augmentation: probabilities averaged over {passes} passes")
    return notes


@dataclass
class _Prediction:
    """The network's output for one session, on the model's grid.

    Attributes:
        labels: ``(X', Y', Z')`` uint8, the argmax of the (averaged) probabilities.
        box: the head's bounding box on the model's grid, where the network predicted.
        probs: ``(C, *box shape)`` float16 probabilities inside ``box``, kept when they are
            to be resampled back to the input's grid; else ``None``.
        uncertainty: ``(X', Y', Z')`` normalised entropy of the probabilities (0 outside
            the box), with TTA; else ``None``.
        passes: forward passes over the volume (1, or 1 + flips with TTA).
        backend: what ran the network, ``"torch"`` or ``"openvino"``.
    """

    labels: np.ndarray
    box: tuple[slice, slice, slice]
    probs: torch.Tensor | None = None
    uncertainty: np.ndarray | None = None
    passes: int = 1
    backend: str = "torch"


def tta_flips(model: ExportedModel) -> list[tuple[int, ...]]:
    """The flips of ``neonb segment --tta``: every combination of the training's flip axes.

    The axes are those of the model's training augmentation (``training_config`` in
    :data:`~neonb.export.METADATA_FILE`: ``augmentation.flip_axes``, when ``flip_prob`` > 0;
    the default :class:`~neonb.transforms.AugmentationConfig`'s when not recorded), on the
    model's voxel grid, where the flips were applied in training. With all three axes that is
    seven flips, eight passes with the unflipped one, as nnU-Net's mirroring.
    """
    augmentation = (model.metadata.get("training_config") or {}).get("augmentation") or {}
    if float(augmentation.get("flip_prob", 0.5)) <= 0:
        return []
    return flip_combinations(augmentation.get("flip_axes", (0, 1, 2)))


def _predict(
    model: ExportedModel,
    image: torch.Tensor,
    device: str | torch.device,
    amp: bool | str,
    *,
    keep_probs: bool = False,
    tta: bool = False,
    backend: str = "auto",
) -> tuple[_Prediction, dict[str, float] | None]:
    """Labels (and, for an AgeU-Net, ages as :func:`neonb.ageunet.segment_with_age` gives them).

    ``keep_probs`` keeps the probabilities (to resample them back); ``tta`` averages over
    :func:`tta_flips` and adds the uncertainty map; ``backend`` as
    :meth:`~neonb.export.ExportedModel.network`.
    """
    windows = None
    if model.age_head is not None:
        from neonb.ageunet import WindowAges

        windows = WindowAges()
    flips = tta_flips(model) if tta else []
    network = model.network(backend, device, amp)
    probs, box = predict_foreground(
        network, image, patch_size=model.patch_size, overlap=model.overlap, device=device,
        amp=amp, segmentation_logits=windows, flips=flips,
        sw_batch_size=default_sw_batch_size(model.patch_size),
    )  # fmt: skip
    labels = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
    labels[box] = class_indices(probs).to(torch.uint8).numpy()
    prediction = _Prediction(labels, box, passes=1 + len(flips), backend=backend_name(network))
    if keep_probs:
        prediction.probs = probs.to(torch.float16)
    if tta:
        uncertainty = np.zeros(labels.shape, np.float32)
        uncertainty[box] = normalised_entropy(probs).numpy()
        prediction.uncertainty = uncertainty
    if windows is None:
        return prediction, None
    ages = windows.aggregate()
    return prediction, {key: float(value) for key, value in ages.items()}


def precision(device: str | torch.device, amp: bool | str = "native") -> str:
    """``"bf16"`` or ``"fp32"``: what the network computes in (:func:`use_inference_amp`)."""
    return "bf16" if use_inference_amp(amp, resolve_device(device)) else "fp32"


def _volume_table(
    labels: np.ndarray,
    zooms: Sequence[float],
    model: ExportedModel,
    scan_age: float | None = None,
) -> pd.DataFrame:
    """Volume of every class (mL) and, with the model's norms and a known scan age, its
    centile (:meth:`neonb.norms.Norms.centile`: text, so that ``<3`` and ``>97`` say what a
    clipped number would hide), the norms' median and why a centile is missing."""
    table = pd.DataFrame(model.metadata["labels"])[["index", "name", "abbreviation"]]
    table["volume_ml"] = volumes_ml(labels, zooms, num_classes=len(table))
    norms = _model_norms(model)
    if norms is not None and _known_age(scan_age):
        read = [
            norms.centile(str(abbreviation), float(scan_age), float(volume))
            for abbreviation, volume in zip(table["abbreviation"], table["volume_ml"], strict=True)
        ]
        table["centile"] = [r.text for r in read]
        table["norm_median_ml"] = [r.median_ml for r in read]
        table["norm_note"] = [r.note for r in read]
    return table


def _known_age(scan_age: float | None) -> bool:
    return scan_age is not None and math.isfinite(float(scan_age))


def _model_norms(model: ExportedModel) -> Norms | None:
    """The norms of the model folder (:func:`neonb.norms.load_norms`), read once per file
    version (a batch asks for them once per session)."""
    path = model.model_dir / NORMS_FILE
    try:
        status = path.stat()
    except OSError:
        return None
    return _cached_norms(str(model.model_dir), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=4)
def _cached_norms(model_dir: str, _mtime_ns: int, _size: int) -> Norms | None:
    return load_norms(model_dir)


def _norms_wanted(model: ExportedModel, scan_age: float | None) -> bool:
    """Whether a session gets the norms picture: the model has norms and the age is known."""
    return _known_age(scan_age) and (model.model_dir / NORMS_FILE).is_file()


def _norms_outputs(
    session: _Session, volumes: pd.DataFrame, sidecar: dict[str, Any]
) -> dict[str, Callable[[Path], Any]]:
    """The norms picture's writer (when planned), and the norms' caveat in the sidecar."""
    if "norms" not in session.paths:
        return {}
    norms = _model_norms(session.model)
    if norms is None:
        path = session.model.model_dir / NORMS_FILE
        raise DataError(path, "went missing while segmenting: no centiles")
    sidecar["Norms"] = {
        "File": str((session.model.model_dir / NORMS_FILE).resolve()),
        "ScanAgeWeeks": float(session.scan_age),
        "AgeRangeWeeks": list(norms.age_range_weeks),
        "Sessions": norms.n_sessions,
        "Synthetic": norms.synthetic,
        "Caveat": norms.caveat,
    }
    age = float(session.scan_age)
    title = f"{output_prefix(session.anchor_path)}: scan age {age:.1f} weeks PMA"
    return {"norms": lambda tmp: plot_norms(norms, volumes, age, tmp, title=title)}


def _write_tsv(table: pd.DataFrame) -> Callable[[Path], Any]:
    return lambda tmp: table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")


def _write_text(text: str) -> Callable[[Path], Any]:
    return lambda tmp: tmp.write_text(text, encoding="utf-8")


def _write_all(paths: Mapping[str, Path], writers: Mapping[str, Callable[[Path], Any]]) -> None:
    """Write every output atomically, in ``paths`` order; on failure remove what was written."""
    written: list[Path] = []
    try:
        for key, path in paths.items():
            try:
                writers[key](path)
            except OSError as err:
                raise DataError(path, f"cannot be written: {err.strerror or err}") from err
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def segment_scan(
    model: ExportedModel | str | os.PathLike,
    t2w: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    t1w: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    prefix: str | None = None,
    scan_age: float | None = None,
    device: str | torch.device = "auto",
    amp: bool | str = "native",
    tta: bool = False,
    backend: str = "auto",
) -> SegmentationResult:
    """Segment one session and write its outputs (see the module docstring).

    Args:
        model: an :class:`~neonb.export.ExportedModel` or its folder.
        t2w: the T2w image (any orientation, any voxel size); required when the model
            takes T2w (``None`` for a T1w-only model).
        out_dir: where to write (created).
        t1w: the T1w image, on the T2w's grid when both are given; required when the model
            takes T1w.
        reference: a segmentation (labels 0-9) to evaluate against: adds a Dice table.
        prefix: output name prefix; default :func:`output_prefix` of the anchor image
            (:func:`neonb.models.reference_channel`: the T2w, or a T1w-only model's T1w),
            whose grid and header the outputs take.
        scan_age: the scan age (weeks PMA), recorded beside the predicted age.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        amp: bf16 autocast of the network (:func:`neonb.inference.use_inference_amp`):
            ``"native"`` (CUDA, or a CPU with native bf16), ``"auto"`` (CUDA), ``True``,
            ``False`` (fp32).
        tta: flip test-time augmentation (:func:`tta_flips`; 8 passes of the network for
            the paper's three flip axes): probabilities averaged, and an uncertainty map,
            a QC score and flag (:func:`qc_score`, :func:`qc_threshold`). Without it the
            network runs once and no uncertainty is computed.
        backend: where the windows run (:data:`neonb.inference.BACKENDS`): ``"auto"``
            (the default: OpenVINO on the CPU where it is installed, about twice PyTorch's
            speed there, with labels within float rounding of PyTorch's; PyTorch on a GPU),
            ``"torch"`` or ``"openvino"``.

    Returns:
        The outputs written, the tissue volumes, ages, Dice, notes and QC score.

    Raises:
        DataError: naming the file, for any bad input (:func:`load_inputs`), an output that
            would replace an input (:func:`check_no_input_replaced`), an output folder that
            cannot be written, or a result with no brain labelled (every voxel background).
            Nothing is written then, and no output folder is left behind.
        ConfigError: when ``device`` is CUDA and there is no GPU.
    """
    started = time.perf_counter()
    _check_device(device)
    session = _prepare_session(
        _as_model(model), t2w, out_dir, t1w=t1w, reference=reference, prefix=prefix,
        scan_age=scan_age, started=started, precision=precision(device, amp), tta=tta,
    )  # fmt: skip
    try:
        return _finish_session(session, *_infer_session(session, device, amp, backend))
    except BaseException:
        _remove_created(session.created)
        raise


def prepare_image(
    volumes: Sequence[np.ndarray], mapping: GridMapping, channels: Sequence[str]
) -> MetaTensor:
    """A session's network input: on the model's grid, pre-processed as in training.

    The volumes are brought onto the model's grid (:func:`to_model_grid`), then go through
    the pre-processing the model was trained and evaluated with,
    :func:`neonb.transforms.preprocessing_transforms` without the crop (z-normalisation of
    each channel over its non-zero voxels), so ``neonb segment`` and the study prepare an
    image alike.

    Args:
        volumes: arrays of shape ``mapping.shape``, one per channel, in the order of ``channels``.
        mapping: from :func:`plan_grid`.
        channels: the model's input channels, e.g. ``("t1w", "t2w")``.

    Returns:
        ``(C, X', Y', Z')`` float32, with the model grid's affine.
    """
    grid = to_model_grid(volumes, mapping)
    sample = {key: grid[i : i + 1] for i, key in enumerate(channels)}
    prepare = preprocessing_transforms(crop=False, label=False, channels=channels)
    return prepare(sample)["image"]


@dataclass
class _Session:
    """One session between its stages: read and prepared, segmented, written."""

    model: ExportedModel
    image: MetaTensor
    images: Mapping[str, nib.Nifti1Image]
    reference_image: nib.Nifti1Image | None
    anchor: nib.Nifti1Image
    mapping: GridMapping
    paths: Mapping[str, Path]
    sources: Mapping[str, str | os.PathLike | None]
    scan_age: float | None
    header_warnings: list[str]
    started: float
    created: list[Path]
    precision: str
    tta: bool = False

    @property
    def anchor_path(self) -> str | os.PathLike:
        """The file of the anchor image, whose name the outputs take."""
        return self.sources[reference_channel(self.model.channels)]


def _prepare_session(
    model: ExportedModel,
    t2w: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    t1w: str | os.PathLike | None,
    reference: str | os.PathLike | None,
    prefix: str | None,
    scan_age: float | None,
    started: float,
    precision: str,
    tta: bool = False,
) -> _Session:
    """Steps 1-3 of :func:`segment_scan` up to the network: read, check, plan, prepare.

    Creates the output folder (after every check, so a refused input leaves none); on a
    failure after that it is removed again.
    """
    images, reference_image = load_inputs(
        {"t2w": t2w, "t1w": t1w},
        model.channels,
        model_name=f"the model {model.model_dir}",
        reference=reference,
        labels=model.labels,
    )
    header_warnings = [
        f"{image.get_filename()}: {warning}"
        for image in [*images.values(), reference_image]
        if image is not None
        for warning in geometry_warnings(image)
    ]
    for warning in header_warnings:
        warnings.warn(warning, NeonbWarning, stacklevel=3)
    out_dir = Path(out_dir)
    sources = {"t2w": t2w, "t1w": t1w}
    paths = output_paths(
        out_dir,
        prefix or output_prefix(sources[reference_channel(model.channels)]),
        age=model.age_head is not None,
        dice=reference_image is not None,
        norms=_norms_wanted(model, scan_age),
        uncertainty=tta,
    )
    check_no_input_replaced([t2w, t1w, reference, *_model_files(model)], list(paths.values()))
    anchor = images[reference_channel(model.channels)]
    mapping = plan_grid(anchor, model.orientation, model.voxel_size_mm)
    created = _prepare_out_dir(out_dir)
    try:
        volumes = [np.asanyarray(images[key].dataobj) for key in model.channels]
        image = prepare_image(volumes, mapping, model.channels)
    except BaseException:
        _remove_created(created)
        raise
    return _Session(
        model, image, images, reference_image, anchor, mapping, paths,
        sources=sources, scan_age=scan_age,
        header_warnings=header_warnings, started=started, created=created, precision=precision,
        tta=tta,
    )  # fmt: skip


def _infer_session(
    session: _Session, device: str | torch.device, amp: bool | str = "auto", backend: str = "auto"
) -> tuple[_Prediction, dict[str, float] | None, float]:
    """The network's part of :func:`segment_scan`: the prediction on the model's grid, ages,
    seconds."""
    inference_started = time.perf_counter()
    prediction, ages = _predict(
        session.model, session.image.as_tensor(), device, amp,
        keep_probs=session.mapping.resampled, tta=session.tta, backend=backend,
    )  # fmt: skip
    return prediction, ages, time.perf_counter() - inference_started


def _finish_session(
    session: _Session,
    prediction: _Prediction,
    ages: dict[str, float] | None,
    inference_s: float,
) -> SegmentationResult:
    """Step 4 of :func:`segment_scan`: labels back on the input's grid, tables, writes."""
    model, anchor, mapping, paths = session.model, session.anchor, session.mapping, session.paths
    source = session.anchor_path
    if mapping.resampled and prediction.probs is not None:
        labels = from_model_grid_probabilities(
            prediction.probs, session.image.affine, mapping,
            box=prediction.box, model_shape=prediction.labels.shape,
        )  # fmt: skip
        prediction.probs = None  # free them before the writes
    else:
        labels = from_model_grid(prediction.labels, session.image.affine, mapping)
    if not np.isin(labels, _brain_labels(model)).any():
        raise DataError(
            anchor.get_filename() or str(source),
            "the model labelled no brain tissue: every voxel came out background, so "
            "nothing was written",
            hint="is this a neonatal brain scan of the contrast and field of view the model "
            "was trained on?",
        )

    # One source of truth for the voxel size: the affine, as for every step above.
    zooms = tuple(float(z) for z in nib.affines.voxel_sizes(anchor.affine)[:3])
    volumes = _volume_table(labels, zooms, model, session.scan_age)
    dice = None
    if session.reference_image is not None:
        reference_labels = np.asanyarray(session.reference_image.dataobj).astype(np.int64)
        dice = volumes[["index", "name", "abbreviation"]].copy()
        dice["dice"] = dice_per_class(labels, reference_labels, num_classes=len(dice))
    notes = _notes(mapping, model, prediction.passes)
    sidecar = _sidecar(session.sources, model, mapping, notes)
    sidecar["InferencePrecision"] = session.precision
    sidecar["InferenceBackend"] = prediction.backend
    sidecar["Warnings"] = session.header_warnings
    norm_writers = _norms_outputs(session, volumes, sidecar)
    uncertainty = score = flag = None
    if prediction.uncertainty is not None:
        uncertainty = from_model_grid_map(prediction.uncertainty, session.image.affine, mapping)
        score = qc_score(uncertainty, labels, _brain_labels(model))
        flag = qc_flag(score, qc_threshold(model))
        sidecar |= {
            "TestTimeAugmentation": {"Flips": tta_flips(model), "Passes": prediction.passes},
            "QCUncertainty": score,
            "QCThreshold": qc_threshold(model),
            "QCFlagged": flag,
            "QCMeasure": QC_MEASURE,
        }
    writers: dict[str, Callable[[Path], Any]] = {
        "dseg_tsv": _write_tsv(pd.DataFrame(model.metadata["labels"])),
        "sidecar": _write_text(json.dumps(sidecar, indent=2) + "\n"),
        "volumes": _write_tsv(volumes),
        "qc": lambda tmp: save_qc_png(
            anchor, labels, model.metadata["labels"], tmp, title=output_prefix(source)
        ),
        "dseg": lambda _tmp: save_segmentation(labels, anchor.get_filename(), paths["dseg"]),
    }
    if ages is not None:
        scan_age = session.scan_age
        age_row = {
            "predicted_age_weeks": ages.get("mean", math.nan),
            "predicted_age_foreground_weighted_weeks": ages.get("foreground_weighted", math.nan),
            "scan_age_weeks": math.nan if scan_age is None else float(scan_age),
        }
        writers["age"] = _write_tsv(pd.DataFrame([age_row]))
    if dice is not None:
        writers["dice"] = _write_tsv(dice)
    writers |= norm_writers
    if uncertainty is not None:
        writers["uncertainty"] = lambda tmp: save_map(uncertainty, anchor, tmp)
    _write_all(paths, {key: _atomic(paths[key], writers[key], key) for key in paths})
    return SegmentationResult(
        outputs=dict(paths),
        volumes=volumes,
        ages=ages,
        dice=dice,
        notes=notes,
        warnings=session.header_warnings,
        inference_s=inference_s,
        seconds=time.perf_counter() - session.started,
        qc_uncertainty=score,
        qc_flag=flag,
    )


QC_MEASURE = (
    "mean over the voxels labelled brain of the entropy of the flip-TTA-averaged class "
    "probabilities divided by ln(number of classes) (0: certain, 1: uniform)"
)
"""What the QC score is, as written in the sidecar."""


def qc_score(uncertainty: np.ndarray, labels: np.ndarray, brain_labels: Sequence[int]) -> float:
    """The QC score of a segmentation: mean uncertainty inside the predicted brain.

    Args:
        uncertainty: ``(X, Y, Z)`` normalised entropy in [0, 1]
            (:func:`neonb.inference.normalised_entropy`).
        labels: ``(X, Y, Z)`` labels on the same grid.
        brain_labels: the label values that are brain (not background).

    Returns:
        The mean, in [0, 1]; NaN when no voxel is brain.
    """
    brain = np.isin(labels, list(brain_labels))
    return float(np.asarray(uncertainty, np.float64)[brain].mean()) if brain.any() else math.nan


def qc_threshold(model: ExportedModel) -> float | None:
    """The QC threshold calibrated at export (``qc.threshold`` in :data:`METADATA_FILE`), or
    ``None`` when the model folder has none (:func:`neonb.export.calibrate_qc`)."""
    value = (model.metadata.get("qc") or {}).get("threshold")
    return None if value is None else float(value)


def qc_flag(score: float, threshold: float | None) -> bool | None:
    """Whether a QC score is above the threshold: look at this segmentation. ``None`` when
    there is no threshold; ``True`` for a NaN score (nothing labelled brain)."""
    if threshold is None:
        return None
    return bool(math.isnan(score) or score > threshold)


def score_session(
    model: ExportedModel | str | os.PathLike,
    t2w: str | os.PathLike | None,
    *,
    t1w: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    amp: bool | str = "native",
    backend: str = "auto",
) -> float:
    """The QC score ``neonb segment --tta`` gives a session, without writing anything.

    The same steps as :func:`segment_scan` with ``tta=True`` up to :func:`qc_score`: read
    and check, bring onto the model's grid, predict with flip TTA, map the labels and the
    uncertainty back to the input's grid. Used to calibrate a model's QC threshold
    (:func:`neonb.export.calibrate_qc`). ``t2w``, ``t1w`` and ``backend`` as in
    :func:`segment_scan`.

    Raises:
        DataError: for a bad input (:func:`load_inputs`).
    """
    model = _as_model(model)
    images, _ = load_inputs(
        {"t2w": t2w, "t1w": t1w}, model.channels, model_name=f"the model {model.model_dir}"
    )
    anchor = images[reference_channel(model.channels)]
    mapping = plan_grid(anchor, model.orientation, model.voxel_size_mm)
    volumes = [np.asanyarray(images[key].dataobj) for key in model.channels]
    image = prepare_image(volumes, mapping, model.channels)
    prediction, _ = _predict(
        model, image.as_tensor(), device, amp, keep_probs=mapping.resampled, tta=True,
        backend=backend,
    )  # fmt: skip
    if mapping.resampled:
        labels = from_model_grid_probabilities(
            prediction.probs, image.affine, mapping,
            box=prediction.box, model_shape=prediction.labels.shape,
        )  # fmt: skip
    else:
        labels = from_model_grid(prediction.labels, image.affine, mapping)
    uncertainty = from_model_grid_map(prediction.uncertainty, image.affine, mapping)
    return qc_score(uncertainty, labels, _brain_labels(model))


def save_map(values: np.ndarray, reference: SpatialImage, path: str | os.PathLike) -> None:
    """Write a float32 map as NIfTI in the space (affine, header) of ``reference``.

    Args:
        values: ``(X, Y, Z)`` on ``reference``'s grid.
        reference: the input image (the T2w).
        path: the file to write (``.nii.gz``); the caller makes the write atomic.
    """
    header = reference.header.copy()
    image = nib.Nifti1Image(np.asarray(values, np.float32), reference.affine, header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(np.nan, np.nan)
    image.header.set_intent("none")
    image.set_qform(*reference.get_qform(coded=True))
    image.set_sform(*reference.get_sform(coded=True))
    nib.save(image, str(path))


def _sidecar(
    sources: Mapping[str, str | os.PathLike | None],
    model: ExportedModel,
    mapping: GridMapping,
    notes: list[str],
) -> dict[str, Any]:
    """The BIDS JSON sidecar of a segmentation: where it comes from and what was done."""
    return {
        "Description": "neonb segmentation (drawem9 labels) predicted by a 3D U-Net",
        "Sources": [str(Path(path).resolve()) for path in sources.values() if path],
        "GeneratedBy": [{"Name": "neonb", "Version": __version__}],
        "Model": str(model.model_dir.resolve()),
        "ModelTrainingData": _training_description(model.metadata.get("training_data")),
        "InputOrientation": mapping.orientation,
        "InputVoxelSizeMm": list(mapping.voxel_size_mm),
        "ModelOrientation": model.orientation,
        "ModelVoxelSizeMm": list(model.voxel_size_mm),
        "Reoriented": mapping.reoriented,
        "Resampled": mapping.resampled,
        "Notes": notes,
    }


def _training_description(training_data: Any) -> Any:
    """The model's description of its training data, whatever shape the field has."""
    if isinstance(training_data, Mapping):
        return training_data.get("description")
    return training_data if isinstance(training_data, str) else None


def _atomic(path: Path, write: Callable[[Path], Any], key: str) -> Callable[[Path], Any]:
    """``write`` through :func:`atomic_write` (the NIfTI writer already is atomic)."""
    if key == "dseg":
        return write
    return lambda _path: atomic_write(path, write)


# --------------------------------------------------------------------------------------
# QC image
# --------------------------------------------------------------------------------------


def save_qc_png(
    image: SpatialImage,
    labels: np.ndarray,
    label_rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> None:
    """Save a tri-planar view of the labels over the image as a PNG (nilearn ``plot_roi``).

    The cuts go through the centre of mass of the labelled voxels, in world coordinates
    and the neurological convention (the subject's left on the left).

    Args:
        image: the input image (the T2w), 3D.
        labels: labels on ``image``'s grid, ``(X, Y, Z)``.
        label_rows: label table rows with ``index`` and ``color`` (``#rrggbb``).
        path: where to write the PNG (write to a temporary name, then rename).
        title: text drawn on the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from nilearn import plotting

    colours = {int(row["index"]): str(row["color"]) for row in label_rows}
    top = max(colours)
    cmap = ListedColormap([colours.get(i, "#000000") for i in range(1, top + 1)])
    seg = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), image.affine)
    foreground = np.argwhere(np.asarray(labels) > 0)
    centre = foreground.mean(axis=0) if len(foreground) else np.array(labels.shape) / 2
    cut_coords = nib.affines.apply_affine(image.affine, centre)
    display = plotting.plot_roi(
        seg,
        bg_img=image,
        cut_coords=cut_coords,
        display_mode="ortho",
        cmap=cmap,
        vmin=0.5,
        vmax=top + 0.5,
        alpha=QC_ALPHA,
        dim=0,
        black_bg=True,
        title=title,
        draw_cross=False,
        annotate=True,
        colorbar=False,
    )
    display.savefig(str(path), dpi=QC_DPI)
    display.close()
    plt.close("all")


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def _is_missing(value: object) -> bool:
    return value is None or str(value).strip().lower() in _MISSING_TEXT


def _resolve(value: object, base: Path) -> str:
    if _is_missing(value):
        return ""
    path = Path(str(value).strip()).expanduser()
    return str(path if path.is_absolute() else base / path)


def _table_from_tsv(path: Path, channels: Sequence[str]) -> pd.DataFrame:
    table = read_tsv(path)
    require_columns(table, BATCH_COLUMNS, path)
    missing = [key for key in channels if key not in table.columns]
    if missing:
        needed = " and ".join(CHANNEL_NAMES[key] for key in channels)
        raise DataError(
            path,
            f"lacks the column(s) {missing}: the model takes {needed} images "
            f"(found {list(map(str, table.columns))})",
            hint=f"add a {missing[0]} column with the path of each session's "
            f"{CHANNEL_NAMES[missing[0]]}",
        )
    rows = []
    for line, (_, row) in zip(table.attrs["lines"], table.iterrows(), strict=True):
        ids = f"sub-{row['participant_id']} ses-{row['session_id']} (row {line})"
        if _is_missing(row["scan_age"]):
            raise DataError(
                path,
                f"missing scan age for {ids}",
                hint="every session needs its scan_age in weeks PMA",
            )
        try:
            scan_age = float(row["scan_age"])
        except ValueError:
            scan_age = math.nan
        if not math.isfinite(scan_age):
            raise DataError(path, f"scan_age {row['scan_age']!r} of {ids} is not a number of weeks")
        rows.append(
            {
                "participant_id": normalise_participant_id(row["participant_id"]),
                "session_id": normalise_session_id(row["session_id"]),
                "scan_age": scan_age,
                "t2w": _resolve(row.get("t2w"), path.parent),
                "t1w": _resolve(row.get("t1w"), path.parent),
                "dseg": _resolve(row.get("dseg"), path.parent),
                "line": line,
                "problem": "",
            }
        )
    return pd.DataFrame(rows)


def _table_from_release(root: Path, images: str) -> pd.DataFrame:
    manifest = read_manifest(root, images=images, progress=False)
    rows = []
    for i, row in manifest.iterrows():
        scan_age = float(row["scan_age"])
        problem = ""
        if not math.isfinite(scan_age):
            problem = next(
                (part for part in str(row["reason"]).split("; ") if "scan age" in part),
                "missing scan age",
            )
        rows.append(
            {
                "participant_id": str(row["participant_id"]),
                "session_id": str(row["session_id"]),
                "scan_age": scan_age,
                "t2w": str(row["t2w"]),
                "t1w": str(row["t1w"]),
                "dseg": str(row["dseg"]),
                "line": int(i) + 1,
                "problem": problem,
            }
        )
    return pd.DataFrame(rows)


def _id_problem(participant_id: str, session_id: str, line: int) -> str:
    """Why these ids cannot name output folders (not BIDS labels), or ``""``."""
    for entity, value in (("participant_id", participant_id), ("session_id", session_id)):
        if not BIDS_LABEL.match(value):
            return (
                f"{entity} {value!r} (row {line}) is not a BIDS label: letters and digits "
                "only, after an optional sub-/ses- prefix"
            )
    return ""


def _valid_ids(session: Any) -> bool:
    return bool(BIDS_LABEL.match(session.participant_id) and BIDS_LABEL.match(session.session_id))


def read_batch(
    source: str | os.PathLike,
    *,
    images: str = "restore",
    channels: Sequence[str] = ("t2w",),
) -> pd.DataFrame:
    """The sessions of a batch: a manifest TSV or a dHCP/BIDS release folder.

    A TSV needs the columns :data:`BATCH_COLUMNS` (``participant_id``, ``session_id``,
    ``scan_age`` in weeks PMA) and one per input channel of the model (``channels``:
    ``t2w``, ``t1w``), and may have the others and ``dseg``; relative paths are
    relative to the TSV's folder; a manifest written by ``neonb manifest --out`` works. A
    folder is read with :func:`neonb.data.read_manifest`, taking the ``images`` kind
    (``"restore"`` or ``"plain"``; :func:`neonb.segmentation.segment_batch` passes the one the
    model was trained on).

    Args:
        source: the manifest TSV or release folder.
        images: the kind of T1w/T2w read from a release folder.
        channels: the model's input channels (:attr:`neonb.export.ExportedModel.channels`):
            a TSV needs a column for each.

    Returns:
        One row per session: ``participant_id``, ``session_id`` (bare), ``scan_age``,
        ``t2w``, ``t1w``, ``dseg`` (paths or ``""``), ``line`` (row in the source) and
        ``problem`` (why the session cannot be segmented, or ``""``: e.g. a participant or
        session id that is not a BIDS label, letters and digits only, which could name a
        folder outside the output folder).

    Raises:
        DataError: naming the source: not found, unreadable, a row with the wrong number of
            fields ("line N: expected K fields, found M"), missing columns (the column of
            an input channel named with the model's channels), no session, a session
            listed twice, or (TSV) a session without a scan age.
    """
    source = Path(source)
    if source.is_dir():
        table = _table_from_release(source, images)
    elif source.is_file():
        table = _table_from_tsv(source, channels)
    else:
        raise DataError(source, "not found: expected a manifest TSV or a dHCP/BIDS folder")
    if table.empty:
        raise DataError(source, "lists no session")
    table["problem"] = [
        _id_problem(row.participant_id, row.session_id, row.line) or row.problem
        for row in table.itertuples(index=False)
    ]
    duplicated = table.duplicated(["participant_id", "session_id"], keep=False)
    if duplicated.any():
        first = table[duplicated].iloc[0]
        same = table[
            (table["participant_id"] == first["participant_id"])
            & (table["session_id"] == first["session_id"])
        ]
        raise DataError(
            source,
            f"duplicate subject/session: sub-{first['participant_id']} "
            f"ses-{first['session_id']} is listed in rows {', '.join(map(str, same['line']))}",
        )
    return table.reset_index(drop=True)


@dataclass
class BatchResult:
    """Outcome of :func:`segment_batch`.

    Attributes:
        summary: one row per session: ``participant_id``, ``session_id``, ``status``
            (``"done"``, ``"skipped"`` — outputs already there — or ``"failed"``),
            ``seconds`` and ``message`` (the error, or the notes).
        summary_path: where the summary was written.
        tables: the gathered tables (:func:`gather_tables`): ``"volumes"``, and ``"dice"``
            when evaluating -> path.
    """

    summary: pd.DataFrame
    summary_path: Path
    tables: dict[str, Path] = field(default_factory=dict)

    def count(self, status: str) -> int:
        """Sessions with this status."""
        return int((self.summary["status"] == status).sum())


def _write_dataset_description(out_dir: Path) -> None:
    path = out_dir / DATASET_DESCRIPTION_FILE
    if path.exists():
        return
    description = {
        "Name": "neonb segmentations",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neonb", "Version": __version__}],
    }
    atomic_write(path, _write_text(json.dumps(description, indent=2) + "\n"))


def segment_batch(
    model: ExportedModel | str | os.PathLike,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    evaluate: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
    prefetch: bool = True,
    amp: bool | str = "native",
    tta: bool = False,
    backend: str = "auto",
) -> BatchResult:
    """Segment every session of a manifest TSV or a dHCP/BIDS folder.

    Outputs go to ``out_dir/sub-<id>/ses-<id>/anat/`` as BIDS derivatives. A session whose
    outputs all exist is skipped, so running the same batch again resumes it. A session that
    fails (a bad image, a missing T1w) is reported and the batch goes on.

    With ``prefetch``, the work overlaps: while the network segments one session, a thread
    reads, checks and prepares the next (:func:`segment_scan`'s steps 1-3), and another
    maps back and writes the previous one (step 4). Each session's outputs, errors and row
    in the summary are the same as one at a time, in the order of ``source``. The progress
    bar shows sessions per minute (sessions segmented or failed, not those skipped).

    Args:
        model: an :class:`~neonb.export.ExportedModel` or its folder.
        source: a manifest TSV or a release folder (:func:`read_batch`).
        out_dir: the derivatives folder (created).
        evaluate: compare with each session's ``dseg`` where there is one (Dice table).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        progress: show a tqdm progress bar.
        echo: called with a line per failed session (default: ``tqdm.write``).
        prefetch: overlap reading and writing with the network's work (``False``: one
            session after the other, each step in turn).
        amp: bf16 autocast of the network, as in :func:`segment_scan`.
        tta: flip test-time augmentation, uncertainty maps and QC, as in
            :func:`segment_scan`; the summary's ``qc_uncertainty`` and ``qc_flag`` columns
            are filled (``n/a`` without it, and ``qc_flag`` without a threshold).
        backend: where the windows run, as in :func:`segment_scan` (compiled once).

    Returns:
        The per-session summary, also written to ``out_dir/segment_batch.tsv``.

    Raises:
        DataError: for a bad source (:func:`read_batch`), an output that would replace an
            input (:func:`check_no_input_replaced`), an output folder that cannot be written,
            or one another batch is writing into (its lock file, :data:`BATCH_LOCK_FILE`, is
            held); nothing is written then.
    """
    _check_device(device)
    model = _as_model(model)
    source = Path(source)
    sessions = read_batch(source, images=model.images, channels=model.channels)
    out_dir = Path(out_dir)
    _check_batch_outputs(model, source, sessions, out_dir, evaluate, tta)
    created = _prepare_out_dir(out_dir)
    try:
        with exclusive_lock(out_dir / BATCH_LOCK_FILE, "a neonb segment --batch"):
            return _run_batch(
                model,
                source,
                sessions,
                out_dir,
                evaluate,
                device,
                progress,
                echo,
                prefetch,
                amp,
                tta,
                backend,
            )
    except BaseException:
        _remove_created(created)
        raise


def _check_batch_outputs(
    model: ExportedModel,
    source: Path,
    sessions: pd.DataFrame,
    out_dir: Path,
    evaluate: bool,
    tta: bool = False,
) -> None:
    """Refuse a batch in which any output would replace any input."""
    inputs: list[str | os.PathLike] = [*_model_files(model)]
    if source.is_file():
        inputs.append(source)
    outputs = [out_dir / name for name in (DATASET_DESCRIPTION_FILE, BATCH_SUMMARY_FILE)]
    outputs += [out_dir / name for name, _ in BATCH_TABLES.values()]
    outputs.append(out_dir / BATCH_LOCK_FILE)
    for session in sessions.itertuples(index=False):
        inputs += [path for path in (session.t2w, session.t1w, session.dseg) if path]
        if _valid_ids(session):
            dice = bool(evaluate and session.dseg)
            outputs += _session_outputs(
                out_dir, session.participant_id, session.session_id,
                age=model.age_head is not None, dice=dice,
                norms=_norms_wanted(model, session.scan_age), uncertainty=tta,
            ).values()  # fmt: skip
    check_no_input_replaced(inputs, outputs)


SUMMARY_COLUMNS: tuple[str, ...] = (
    "participant_id", "session_id", "status", "seconds", "qc_uncertainty", "qc_flag", "message",
)  # fmt: skip
"""Columns of :data:`BATCH_SUMMARY_FILE`, one row per session; the QC columns are filled
with ``--tta`` (:func:`qc_score`, :func:`qc_flag`), ``n/a`` otherwise."""

MAX_PENDING_WRITES = 1
"""Sessions of a batch that may wait to be written while the network works on the next."""

_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def _run_batch(
    model: ExportedModel,
    source: Path,
    sessions: pd.DataFrame,
    out_dir: Path,
    evaluate: bool,
    device: str | torch.device,
    progress: bool,
    echo: Callable[[str], Any] | None,
    prefetch: bool = True,
    amp: bool | str = "native",
    tta: bool = False,
    backend: str = "auto",
) -> BatchResult:
    _write_dataset_description(out_dir)
    batch = _Batch(
        model, source, out_dir, evaluate, device, amp, echo or tqdm.write,
        rows=[None] * len(sessions),
        bar=tqdm(
            total=len(sessions), desc="segmenting", unit="session",
            bar_format=_BAR_FORMAT, disable=not progress,
        ),
        tta=tta, backend=backend,
    )  # fmt: skip
    try:
        batch.run(list(sessions.itertuples(index=False)), prefetch)
    finally:
        batch.bar.close()
        rows = [row for row in batch.rows if row is not None]
        summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
        summary_path = out_dir / BATCH_SUMMARY_FILE
        atomic_write(summary_path, _write_tsv(summary))
    tables = gather_tables(out_dir, sessions, age=model.age_head is not None)
    return BatchResult(summary, summary_path, tables)


class _Immediate(Executor):
    """An executor that runs each call at once, in the calling thread (no prefetch)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to whoever asks for the result
            future.set_exception(err)
        return future


@dataclass
class _Job:
    """A session of a batch on its way: its summary row, and its preparation under way."""

    index: int
    row: dict[str, Any]
    started: float
    status: str = ""
    error: NeonbError | None = None
    prepared: Future | None = None


@dataclass
class _Batch:
    """The sessions of one :func:`segment_batch`, run through read -> network -> write."""

    model: ExportedModel
    source: Path
    out_dir: Path
    evaluate: bool
    device: str | torch.device
    amp: bool | str
    echo: Callable[[str], Any]
    rows: list[dict[str, Any] | None]
    bar: Any
    processed: int = 0
    began: float = field(default_factory=time.perf_counter)
    tta: bool = False
    backend: str = "auto"

    def run(self, sessions: Sequence[Any], prefetch: bool) -> None:
        """Segment ``sessions`` in order; rows land in :attr:`rows` as sessions finish.

        With ``prefetch``, session ``i + 1`` is prepared in a reading thread while the
        network works on session ``i``, and session ``i`` is written in a writing thread
        while the network works on ``i + 1``; at most :data:`MAX_PENDING_WRITES` sessions
        wait to be written (each holds its images in memory).
        """
        reader = ThreadPoolExecutor(1, "neonb-read") if prefetch else _Immediate()
        writer = ThreadPoolExecutor(1, "neonb-write") if prefetch else _Immediate()
        writes: dict[int, tuple[_Job, Future]] = {}
        upcoming: _Job | None = None
        try:
            for i, row in enumerate(sessions):
                job = upcoming or self.start(i, row, reader)
                session = self.prepared(job)
                upcoming = None
                if prefetch and i + 1 < len(sessions):
                    upcoming = self.start(i + 1, sessions[i + 1], reader)
                if session is not None:
                    labels, ages, seconds = self.infer(session)
                    future = writer.submit(_finish_or_remove, session, labels, ages, seconds)
                    writes[i] = (job, future)
                self.collect(writes, keep=MAX_PENDING_WRITES)
            self.collect(writes, keep=0)
        finally:  # interrupted: finish the writes under way, take back a prefetched session
            if upcoming is not None and upcoming.prepared is not None:
                if not upcoming.prepared.cancel():
                    with contextlib.suppress(BaseException):
                        _remove_created(upcoming.prepared.result().created)
            with contextlib.suppress(BaseException):
                self.collect(writes, keep=0)
            reader.shutdown(wait=True)
            writer.shutdown(wait=True)

    def start(self, index: int, session: Any, reader: Executor) -> _Job:
        """Decide what to do with a session and, unless it is done or failed, prepare it."""
        pid, sid = session.participant_id, session.session_id
        job = _Job(
            index,
            {"participant_id": pid, "session_id": sid, "seconds": 0.0, "message": ""},
            time.perf_counter(),
        )
        if not _valid_ids(session):  # no output path may be built from these ids
            job.error = DataError(self.source, session.problem)
            return job
        reference = session.dseg if self.evaluate and session.dseg else None
        expected = _session_outputs(
            self.out_dir, pid, sid, age=self.model.age_head is not None,
            dice=reference is not None, norms=_norms_wanted(self.model, session.scan_age),
            uncertainty=self.tta,
        )  # fmt: skip
        if all(path.is_file() for path in expected.values()):
            job.status, job.row["message"] = "skipped", "outputs already there"
            job.row |= _qc_from_sidecar(expected["sidecar"]) if self.tta else {}
            return job
        absent = [key for key in self.model.channels if not getattr(session, key)]
        if session.problem or absent:
            job.error = DataError(
                f"sub-{pid}/ses-{sid}", session.problem or _no_image(self.model, absent)
            )
            return job
        job.prepared = reader.submit(
            _prepare_session, self.model, session.t2w or None,
            self.out_dir / f"sub-{pid}" / f"ses-{sid}" / "anat",
            t1w=session.t1w or None, reference=reference, prefix=f"sub-{pid}_ses-{sid}",
            scan_age=session.scan_age, started=job.started,
            precision=precision(self.device, self.amp), tta=self.tta,
        )  # fmt: skip
        return job

    def prepared(self, job: _Job) -> _Session | None:
        """The job's prepared session, or ``None`` when its row is final (skipped, failed)."""
        if job.status == "skipped":
            self.finish(job, {**job.row, "status": "skipped"})
            return None
        try:
            if job.error is not None:
                raise job.error
            return job.prepared.result()
        except NeonbError as err:
            self.finish(job, self.failed(job, err))
            return None

    def infer(self, session: _Session) -> tuple[_Prediction, dict[str, float] | None, float]:
        """The network's work on one session; its output folder is taken back on an error."""
        try:
            return _infer_session(session, self.device, self.amp, self.backend)
        except BaseException:
            _remove_created(session.created)
            raise

    def collect(self, writes: dict[int, tuple[_Job, Future]], *, keep: int) -> None:
        """Record the sessions whose writing has ended, waiting until at most ``keep`` are left."""
        for index in sorted(writes):
            job, future = writes[index]
            if len(writes) <= keep and not future.done():
                continue
            del writes[index]
            try:
                result = future.result()
            except NeonbError as err:
                self.finish(job, self.failed(job, err))
                continue
            message = "; ".join([*result.notes, *(f"warning: {w}" for w in result.warnings)])
            row = {
                **job.row, "status": "done", "seconds": result.seconds, "message": message,
                "qc_uncertainty": result.qc_uncertainty, "qc_flag": result.qc_flag,
            }  # fmt: skip
            self.finish(job, row)

    def failed(self, job: _Job, err: NeonbError) -> dict[str, Any]:
        """The row of a failed session, said through :attr:`echo`."""
        return _failed(job.row, err, job.started, self.echo)

    def finish(self, job: _Job, row: dict[str, Any]) -> None:
        """Record a session's final row and move the progress bar."""
        self.rows[job.index] = row
        if row["status"] != "skipped":
            self.processed += 1
            minutes = (time.perf_counter() - self.began) / 60
            self.bar.set_postfix_str(f"{self.processed / minutes:.1f} sessions/min", refresh=False)
        self.bar.update(1)


def _no_image(model: ExportedModel, absent: Sequence[str]) -> str:
    """Why a batch session without the image of some of the model's channels is skipped."""
    needed = " and ".join(CHANNEL_NAMES[key] for key in model.channels)
    return (
        f"no {' or '.join(CHANNEL_NAMES[key] for key in absent)} image: the model "
        f"{model.model_dir} needs {needed} inputs (the manifest's "
        f"{' and '.join(absent)} column)"
    )


def _qc_from_sidecar(path: Path) -> dict[str, Any]:
    """The QC score and flag a skipped session's sidecar recorded (none if unreadable)."""
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"qc_uncertainty": sidecar.get("QCUncertainty"), "qc_flag": sidecar.get("QCFlagged")}


def flagged_sessions(summary: pd.DataFrame) -> list[str]:
    """``sub-<id> ses-<id>`` of each session of a batch summary whose QC flag is set."""
    if "qc_flag" not in summary:
        return []
    flagged = summary[summary["qc_flag"].map(lambda v: v is True or v == 1 or v == "True")]
    return [f"sub-{r.participant_id} ses-{r.session_id}" for r in flagged.itertuples()]


def _finish_or_remove(
    session: _Session, prediction: _Prediction, ages: dict[str, float] | None, seconds: float
) -> SegmentationResult:
    """:func:`_finish_session`, taking the session's output folder back on an error."""
    try:
        return _finish_session(session, prediction, ages, seconds)
    except BaseException:
        _remove_created(session.created)
        raise


def _session_outputs(out_dir: Path, pid: str, sid: str, **kinds: bool) -> dict[str, Path]:
    folder = out_dir / f"sub-{pid}" / f"ses-{sid}" / "anat"
    return output_paths(folder, f"sub-{pid}_ses-{sid}", **kinds)


def gather_tables(
    out_dir: str | os.PathLike, sessions: pd.DataFrame, *, age: bool = False
) -> dict[str, Path]:
    """One row per segmented session: tissue volumes (and Dice, ages) side by side.

    Reads the per-session tables of a batch's output folder and writes
    ``out_dir/volumes.tsv`` (``participant_id``, ``session_id``, ``scan_age``, then
    ``volume_ml_<class>`` per class, e.g. ``volume_ml_WM``, and with an age head the
    predicted ages) and, where sessions were evaluated, ``out_dir/dice.tsv``
    (``dice_<class>``). Sessions without outputs are left out.

    Args:
        out_dir: a batch's output folder.
        sessions: the batch's sessions (:func:`read_batch`).
        age: the model has an age head (add its predictions to ``volumes.tsv``).

    Returns:
        Output kind -> path of each table written.
    """
    out_dir = Path(out_dir)
    written = {}
    for kind, (name, prefix) in BATCH_TABLES.items():
        rows = []
        for session in sessions.itertuples(index=False):
            if not _valid_ids(session):
                continue
            pid, sid = session.participant_id, session.session_id
            paths = _session_outputs(out_dir, pid, sid, age=age, dice=kind == "dice")
            if not paths[kind].is_file() or not paths["dseg"].is_file():
                continue
            table = pd.read_csv(paths[kind], sep="\t")
            value = "volume_ml" if kind == "volumes" else table.columns[-1]
            row = {"participant_id": pid, "session_id": sid, "scan_age": session.scan_age}
            row |= {
                class_column(int(i), prefix): v
                for i, v in zip(table["index"], table[value], strict=True)
            }
            if kind == "volumes" and "centile" in table:  # the model's norms: add the centiles
                row |= {
                    class_column(int(i), "centile_"): c
                    for i, c in zip(table["index"], table["centile"], strict=True)
                    if not _is_missing(c)
                }
            if kind == "volumes" and age and paths["age"].is_file():
                row |= pd.read_csv(paths["age"], sep="\t").iloc[0].drop("scan_age_weeks").to_dict()
            rows.append(row)
        if rows:
            path = out_dir / name
            atomic_write(path, _write_tsv(pd.DataFrame(rows)))
            written[kind] = path
    return written


def _failed(
    row: dict[str, Any], err: NeonbError, started: float, echo: Callable[[str], Any]
) -> dict[str, Any]:
    message = " ".join(str(err).split())
    echo(f"sub-{row['participant_id']} ses-{row['session_id']}: failed: {message}")
    return {**row, "status": "failed", "seconds": time.perf_counter() - started, "message": message}
