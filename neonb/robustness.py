"""Test scans shifted away from the training data, at increasing severity.

A network trained on one scanner's images meets, in the clinic, other scanners' contrast,
older or younger brains, bias fields, thick slices, movement and noise. This module makes
such test scans from clean ones, each kind of shift at a few severities in physical or
otherwise meaningful units, so that the robustness chapter can plot each network's Dice
against severity. Severity 0 is always the clean scan.

==================  =================================================  ===================
shift               what changes                                       severity (unit)
==================  =================================================  ===================
``scanner``         another scanner's intensity curve, ``x**gamma``,   ``|log gamma|``
                    and each tissue's intensity (log-SD = severity/2)
``age_contrast``    white matter moves towards grey matter, as with    WM-cGM contrast
                    myelination: 1 removes the contrast, >1 inverts    removed (fraction)
``bias``            smooth multiplicative field (TorchIO's             log-SD of the field
                    polynomial, order 3)                               over the head
``thick_slices``    slices of this thickness along Z (Gaussian         slice thickness, mm
                    profile, FWHM = thickness), resampled back
``motion``          one head movement of up to 3 deg and 3 mm (TorchIO  fraction of k-space
                    ``Motion``), late in the scan                      after the movement
                                                                       (at most 0.5)
``noise``           Rician noise                                       noise SD / mean
                                                                       brain intensity
==================  =================================================  ===================

Every shift keeps the shape, writes float32 and leaves the voxels outside the head (0 in
every image) at 0; inside the head intensities stay positive, as magnitude images are.
A session's random draws depend on the seed, its ids and the kind of shift, not on the
severity: the levels of one kind are the same draw made stronger, so that Dice against
severity is a paired curve and adding a level changes no other.

TorchIO is imported when a shift that needs it is made.

Example:
    >>> import numpy as np
    >>> from neonb.robustness import shift_session
    >>> label = np.zeros((16, 16, 16), np.uint8)
    >>> label[4:12, 4:12, 4:12] = 3
    >>> t2w = np.where(label > 0, 1.0, 0.0).astype(np.float32)
    >>> out = shift_session({"t2w": t2w}, label, (1.0, 1.0, 1.0), "noise", 0.05, seed=0)
    >>> out["t2w"].shape, out["t2w"].dtype, float(out["t2w"][0, 0, 0])
    ((16, 16, 16), dtype('float32'), 0.0)
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, stats
from tqdm import tqdm

from neonb.data import TSV_MISSING, read_tsv
from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write
from neonb.labels import DRAWEM9
from neonb.statistics import Claim, check_claims, mean_interval

__all__ = [
    "CLEAN",
    "SEVERITIES",
    "SHIFTED_COLUMNS",
    "SHIFTS",
    "UNITS",
    "check_goals",
    "qc_separation",
    "qc_study",
    "roc_auc",
    "score_shifts",
    "severe_losses",
    "severity_table",
    "shift_seed",
    "shift_session",
    "shifted_records",
    "write_shifted_sessions",
]

SHIFTS: tuple[str, ...] = ("scanner", "age_contrast", "bias", "thick_slices", "motion", "noise")
"""The kinds of shift, in the order tables and figures list them."""

SEVERITIES: dict[str, tuple[float, ...]] = {
    "scanner": (0.2, 0.4, 0.6),
    "age_contrast": (0.5, 1.0, 1.5),
    "bias": (0.1, 0.2, 0.3),
    "thick_slices": (3.0, 4.0, 5.0),
    "motion": (0.2, 0.35, 0.5),
    "noise": (0.05, 0.1, 0.2),
}
"""Default severities of each shift (0, the clean scan, is implied).

``scanner``: gamma of 0.55-1.8. ``age_contrast``: 1 is the contrast gone, as around the
age at which myelination makes white and grey matter alike, 1.5 half of it inverted.
``bias``: the phantom's residual field has a log-SD of about 0.07, its uncorrected scans
0.07-0.19. ``thick_slices``: clinical neonatal scans have 3-5 mm slices, against the
dHCP's 0.5 mm voxels. ``motion``: the size of a movement hardly matters beyond a few
voxels (the k-space segments of misaligned images then disagree as much as they can);
when it happens does: 0.5 is a movement half-way through, as the centre of k-space is
acquired. ``noise``: 0.05-0.2 adds noise at an SNR of 20 down to 5 to the scan's own (the
phantom's SNR is 20-30).
"""

UNITS: dict[str, str] = {
    "scanner": "|log gamma|",
    "age_contrast": "fraction of WM-cGM contrast removed",
    "bias": "log-SD of the bias field",
    "thick_slices": "slice thickness (mm)",
    "motion": "fraction of k-space acquired after the movement",
    "noise": "noise SD / mean brain intensity",
}
"""The unit of each kind's severity, for axis titles."""

CLEAN = "none"
"""The ``shift`` of the clean sessions in :func:`write_shifted_sessions`'s table."""

SHIFTED_COLUMNS: tuple[str, ...] = (
    "participant_id",
    "session_id",
    "source_session_id",
    "scan_age",
    "shift",
    "severity",
    "level",
    "t1w",
    "t2w",
    "label",
    "dseg",
    "seed",
)
"""Columns of ``shifted.tsv``."""

SHIFTED_TSV = "shifted.tsv"
GZIP_LEVEL = 1
"""Compression of the written images: fast, as :mod:`neonb.phantom` writes its own."""
MODALITIES: tuple[str, ...] = ("t1w", "t2w")
SUFFIXES = {"t1w": "T1w", "t2w": "T2w"}
_WM = next(i for i, lab in DRAWEM9.items() if lab.short_name == "WM")
_CGM = next(i for i, lab in DRAWEM9.items() if lab.short_name == "cGM")
BRAIN_TISSUE = tuple(
    i
    for i, lab in DRAWEM9.items()
    if not lab.is_background and lab.short_name not in {"CSF", "Ventr."}
)
"""Labels whose mean intensity sets the noise level: brain tissue without the fluids."""
TISSUE_LOG_SD = 0.5
"""``scanner``: log-SD of each tissue's intensity factor per unit of severity."""
PV_SIGMA_VOXELS = 0.6
"""Gaussian SD (voxels) that softens label-based intensity changes at tissue borders (the
phantom's partial-volume blur)."""
SLICE_AXIS = 2
"""``thick_slices``: the slices are stacked along Z (axial slices)."""
FWHM_PER_SD = 2.0 * math.sqrt(2.0 * math.log(2.0))
BIAS_ORDER = 3
BIAS_GRID = 32
"""``bias``: the polynomial is evaluated on at most this many points per axis, then
interpolated (linearly) to the image grid."""
MOTION_SIZE = 3.0
"""``motion``: largest rotation (deg, about each axis) and translation (mm, along each) of the
movement, drawn uniformly; a restless neonate's, and several voxels at any voxel size used."""
MAX_SEVERITY = {"motion": 0.5}
"""Largest severity of a kind, where it has one: TorchIO's ``Motion`` always keeps the
centre of k-space from the first position, so later fractions would lessen the artefact."""
REFERENCE_PERCENTILE = 99.0
"""``scanner``: intensities are divided by this percentile of the head before the curve."""


def shift_session(
    images: Mapping[str, np.ndarray],
    label: np.ndarray,
    spacing: Sequence[float],
    kind: str,
    severity: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """One session's images with a shift of ``kind`` at ``severity``.

    Args:
        images: ``{"t1w": ..., "t2w": ...}`` (either or both), each ``(X, Y, Z)``, in scanner
            units, 0 outside the head.
        label: drawem9 labels 0-9, ``(X, Y, Z)`` (used by ``scanner``, ``age_contrast`` and
            ``noise``).
        spacing: voxel size in mm, ``(sx, sy, sz)``.
        kind: one of :data:`SHIFTS`.
        severity: in the kind's unit (:data:`UNITS`), at least 0; 0 returns the images.
        seed: seed of the random draws (:func:`shift_seed` for a session); each image gets
            its own stream, so the T2w draw does not depend on whether a T1w is given.

    Returns:
        The shifted images under the same keys, float32, the input's shape; 0 where every
        input image is 0, positive elsewhere.

    Raises:
        ConfigError: for an unknown ``kind`` or a negative or non-finite ``severity``.
        ValueError: when no image is given, or an image's or the label's shape differs.
    """
    _check_shift(kind, severity)
    if not images:
        raise ValueError("shift_session needs at least one image")
    label = np.asarray(label)
    shapes = {key: np.shape(image) for key, image in images.items()}
    if any(shape != label.shape for shape in shapes.values()) or label.ndim != 3:
        raise ValueError(f"images {shapes} and label {label.shape} must share one 3D shape")
    spacing = tuple(float(s) for s in spacing)
    head = np.zeros(label.shape, dtype=bool)
    for image in images.values():
        head |= np.asarray(image) != 0
    out = {}
    for key, image in images.items():
        image = np.asarray(image, dtype=np.float32)
        if severity == 0:
            out[key] = image.copy()
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(key.encode())])
        shifted = _SHIFT_FUNCTIONS[kind](image, label, head, spacing, float(severity), rng)
        out[key] = _positive_in_head(shifted, head)
    return out


def shift_seed(seed: int, participant_id: str, session_id: str, kind: str) -> int:
    """The seed of one session's shift of ``kind``: the same for every severity."""
    text = f"{participant_id}/{session_id}/{kind}".encode()
    return int(np.random.SeedSequence([int(seed), zlib.crc32(text)]).generate_state(1)[0])


def write_shifted_sessions(
    records: Sequence[Mapping[str, Any]],
    shifts: Mapping[str, Sequence[float]],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Write every session under every shift and severity, and a table of them.

    For each record and each ``(kind, severity)`` with severity > 0, the shifted images are
    written (atomically) to
    ``out_dir/sub-<p>/ses-<s>/anat/sub-<p>_ses-<s>_desc-<kind><severity>_<T1w|T2w>.nii.gz``
    with the source's affine and header (data float32), where ``<kind>`` loses its
    underscores and ``<severity>`` spells the point ``p``: ``desc-thickslices3``,
    ``desc-noise0p05``. The table ``out_dir/shifted.tsv`` lists the clean session first
    (shift ``"none"``, severity 0, level 0, the original files), then each shift; it is
    rewritten after every session. Run again, a row of the table whose files exist and
    whose seed matches is not redone, so an interrupted run resumes.

    The table is a batch manifest for :func:`neonb.segmentation.read_batch` (``neonb
    segment --batch``): its ``session_id`` is unique per row, the source session's id
    followed by the shift, e.g. ``1noise0p05`` (the clean row keeps the id); the source id
    is in ``source_session_id``. :func:`shifted_records` turns it into records for
    :mod:`neonb.experiment`.

    Args:
        records: sessions with ``participant_id``, ``session_id``, ``scan_age``, ``t2w``,
            ``label`` and optionally ``t1w`` (paths), as :func:`neonb.data.to_data_dicts`
            gives them.
        shifts: severities of each kind, e.g. :data:`SEVERITIES`; 0 is left out (the clean
            row is always there).
        out_dir: output folder, created if needed.
        seed: base seed; a session's shift of one kind is seeded by :func:`shift_seed`.
        progress: show a tqdm bar of the sessions.

    Returns:
        The table written, with the columns :data:`SHIFTED_COLUMNS`: ids, ``scan_age``,
        ``shift``, ``severity`` (float), ``level`` (the severity's rank within its kind,
        from 1; 0 for the clean row), absolute paths ``t1w`` (``"n/a"`` when the record has
        none), ``t2w``, ``label`` and ``dseg`` (the same labels, under the name
        ``read_batch`` takes), and the ``seed`` of the draw.

    Raises:
        ConfigError: for an unknown kind or a bad severity.
        DataError: for a missing source file or images on different grids (naming the file).
    """
    jobs = _jobs(shifts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _done_rows(out_dir / SHIFTED_TSV)
    rows: list[dict[str, Any]] = []
    for record in tqdm(records, desc="shifted sessions", unit="session", disable=not progress):
        rows += _write_session(record, jobs, out_dir, int(seed), done)
        _write_table(rows, out_dir / SHIFTED_TSV)
    if not rows:
        _write_table(rows, out_dir / SHIFTED_TSV)
    return _as_table(rows)


def shifted_records(table: pd.DataFrame | str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``shifted.tsv`` (or its table) as records for :mod:`neonb.experiment`.

    Returns:
        One dict per row: ``t1w``, ``t2w``, ``label``, ``scan_age``, ``participant_id``,
        ``session_id`` (unique per row), plus ``source_session_id``, ``shift``,
        ``severity`` and ``level``.
    """
    if not isinstance(table, pd.DataFrame):
        table = read_tsv(Path(table))
    keys = ("participant_id", "session_id", "source_session_id", "shift", "t1w", "t2w", "label")
    return [
        {
            **{key: str(row[key]) for key in keys},
            "scan_age": float(row["scan_age"]),
            "severity": float(row["severity"]),
            "level": int(row["level"]),
        }
        for _, row in table.iterrows()
    ]


# =============================================================================================
# The shifts: (image, label, head, spacing mm, severity, rng) -> image
# =============================================================================================


def _scanner(image, label, head, spacing, severity, rng) -> np.ndarray:
    """``x**gamma`` on intensities scaled to the head's 99th percentile, times a smooth
    per-tissue factor."""
    sign = rng.choice((-1.0, 1.0))
    tissue = rng.standard_normal(len(DRAWEM9))
    reference = float(np.percentile(image[head], REFERENCE_PERCENTILE)) if head.any() else 1.0
    reference = reference if reference > 0 else 1.0
    curve = np.power(np.maximum(image / reference, 0.0), math.exp(sign * severity)) * reference
    factors = np.exp(severity * TISSUE_LOG_SD * tissue).astype(np.float32)
    smooth = ndimage.gaussian_filter(factors[_labels(label)], PV_SIGMA_VOXELS)
    return curve * smooth


def _age_contrast(image, label, head, spacing, severity, rng) -> np.ndarray:
    """White matter moved by ``-severity`` times its median contrast to cortical grey matter."""
    labels = _labels(label)
    wm, gm = (labels == _WM) & head, (labels == _CGM) & head
    if not wm.any() or not gm.any():
        return image.copy()
    contrast = float(np.median(image[wm]) - np.median(image[gm]))
    # all of the white matter, and part of its neighbours' border voxels (partial volume)
    weight = np.maximum(ndimage.gaussian_filter(wm.astype(np.float32), PV_SIGMA_VOXELS), wm)
    return image - np.float32(severity * contrast) * weight


def _bias(image, label, head, spacing, severity, rng) -> np.ndarray:
    """TorchIO's polynomial bias field, scaled to a log-SD of ``severity`` over the head."""
    import torchio as tio

    n = (BIAS_ORDER + 1) * (BIAS_ORDER + 2) * (BIAS_ORDER + 3) // 6
    coefficients = rng.uniform(-1.0, 1.0, n)
    # a cubic polynomial is smooth: drawn on a coarse grid and interpolated, it costs little
    coarse = tuple(min(n_voxels, BIAS_GRID) for n_voxels in image.shape)
    field = tio.BiasField.generate_bias_field(
        np.empty((1, *coarse), np.float32), BIAS_ORDER, coefficients.tolist()
    )
    zoom = [full / small for full, small in zip(image.shape, coarse, strict=True)]
    log_field = ndimage.zoom(np.log(field), zoom, order=1, grid_mode=True, mode="nearest")
    inside = log_field[head] if head.any() else log_field.ravel()
    sd = float(inside.std())
    log_field = (log_field - inside.mean()) * (severity / sd if sd > 0 else 0.0)
    return image * np.exp(log_field).astype(np.float32)


def _thick_slices(image, label, head, spacing, severity, rng) -> np.ndarray:
    """Slices of ``severity`` mm along :data:`SLICE_AXIS`, resampled back with TorchIO."""
    import torchio as tio

    if severity <= spacing[SLICE_AXIS]:
        return image.copy()
    affine = np.diag([*spacing, 1.0])
    subject = tio.ScalarImage(tensor=image[None], affine=affine)
    profile = [0.0, 0.0, 0.0]
    profile[SLICE_AXIS] = severity / FWHM_PER_SD
    thick = list(spacing)
    thick[SLICE_AXIS] = severity
    chain = tio.Compose(
        [
            tio.Blur(std=tuple(profile)),
            tio.Resample(tuple(thick), image_interpolation="linear"),
            tio.Resample((image.shape, affine), image_interpolation="linear"),
        ]
    )
    return chain(subject).data[0].numpy()


def _motion(image, label, head, spacing, severity, rng) -> np.ndarray:
    """TorchIO's k-space motion artefact: one rigid movement of up to
    :data:`MOTION_SIZE` degrees and mm, after which a fraction ``severity`` of k-space is
    acquired."""
    import torchio as tio

    degrees = rng.uniform(-1.0, 1.0, (1, 3)) * MOTION_SIZE
    translation = rng.uniform(-1.0, 1.0, (1, 3)) * MOTION_SIZE
    times = np.array([1.0 - severity])
    motion = tio.Motion(
        degrees=degrees, translation=translation, times=times, image_interpolation="linear"
    )
    subject = tio.ScalarImage(tensor=image[None], affine=np.diag([*spacing, 1.0]))
    return motion(subject).data[0].numpy()


def _noise(image, label, head, spacing, severity, rng) -> np.ndarray:
    """Rician noise of SD ``severity`` times the mean intensity of brain tissue."""
    real = rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = rng.standard_normal(image.shape, dtype=np.float32)
    brain = np.isin(_labels(label), BRAIN_TISSUE) & head
    region = brain if brain.any() else head
    sigma = np.float32(severity * (float(image[region].mean()) if region.any() else 1.0))
    return np.sqrt((image + sigma * real) ** 2 + (sigma * imaginary) ** 2)


_SHIFT_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "scanner": _scanner,
    "age_contrast": _age_contrast,
    "bias": _bias,
    "thick_slices": _thick_slices,
    "motion": _motion,
    "noise": _noise,
}


def _labels(label: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(label), 0, len(DRAWEM9) - 1).astype(np.intp)


def _positive_in_head(image: np.ndarray, head: np.ndarray) -> np.ndarray:
    """float32, 0 outside ``head`` and at least the smallest positive float32 inside it."""
    out = np.asarray(image, dtype=np.float32)
    out = np.where(head, np.maximum(out, np.finfo(np.float32).tiny), np.float32(0.0))
    return out.astype(np.float32, copy=False)


def _check_shift(kind: object, severity: object) -> None:
    if kind not in SHIFTS:
        raise ConfigError(f"unknown shift {kind!r}; known: {list(SHIFTS)}")
    try:
        value = float(severity)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"severity of {kind} must be a number, but found {severity!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(
            f"severity of {kind} must be finite and at least 0, but found {severity!r}"
        )
    if value > MAX_SEVERITY.get(str(kind), math.inf):
        raise ConfigError(
            f"severity of {kind} must be at most {MAX_SEVERITY[str(kind)]:g}, "
            f"but found {severity!r}"
        )


# =============================================================================================
# Files
# =============================================================================================


def _severity_code(severity: float) -> str:
    """``3.0`` -> ``"3"``, ``0.05`` -> ``"0p05"``: a BIDS label (letters and digits)."""
    return f"{severity:g}".replace(".", "p").replace("-", "m").replace("+", "")


def _jobs(shifts: Mapping[str, Sequence[float]]) -> list[tuple[str, float, int]]:
    """``(kind, severity, level)`` of every shifted image set, clean first as level 0."""
    jobs = [(CLEAN, 0.0, 0)]
    for kind, severities in shifts.items():
        for severity in severities:
            _check_shift(kind, severity)
        positive = sorted({float(s) for s in severities if float(s) > 0})
        jobs += [(kind, severity, level) for level, severity in enumerate(positive, start=1)]
    return jobs


def _done_rows(path: Path) -> dict[tuple[str, str, str, float], dict[str, Any]]:
    """Rows of an earlier ``shifted.tsv`` keyed by (participant, source session, shift,
    severity); empty when there is none or it cannot be read."""
    if not path.is_file():
        return {}
    try:
        table = read_tsv(path)
        rows = {}
        for _, row in table.iterrows():
            key = (
                str(row["participant_id"]),
                str(row["source_session_id"]),
                str(row["shift"]),
                float(row["severity"]),
            )
            rows[key] = dict(row)
        return rows
    except (DataError, KeyError, ValueError):
        return {}


def _write_session(
    record: Mapping[str, Any],
    jobs: Sequence[tuple[str, float, int]],
    out_dir: Path,
    seed: int,
    done: Mapping[tuple[str, str, str, float], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    participant, session = str(record["participant_id"]), str(record["session_id"])
    sources = {key: record.get(key) for key in MODALITIES}
    sources = {key: str(path) for key, path in sources.items() if _given(path)}
    label_path = str(Path(record["label"]).resolve())
    base = {
        "participant_id": participant,
        "source_session_id": session,
        "scan_age": float(record["scan_age"]),
        "label": label_path,
        "dseg": label_path,
    }
    loaded: dict[str, Any] | None = None
    rows = []
    for kind, severity, level in jobs:
        row = {**base, "shift": kind, "severity": severity, "level": level}
        if kind == CLEAN:
            paths = {key: str(Path(path).resolve()) for key, path in sources.items()}
            rows.append({**row, "session_id": session, **_paths(paths), "seed": 0})
            continue
        tag = kind.replace("_", "") + _severity_code(severity)
        draw = shift_seed(seed, participant, session, kind)
        paths = {
            key: str(_shifted_path(out_dir, participant, session, tag, key).resolve())
            for key in sources
        }
        row = {**row, "session_id": f"{session}{tag}", **_paths(paths), "seed": draw}
        if not _is_done(row, paths, done):
            loaded = loaded or _load(sources, record["label"])
            shifted = shift_session(
                loaded["images"], loaded["label"], loaded["spacing"], kind, severity, draw
            )
            for key, image in shifted.items():
                _save(image, loaded["nifti"][key], Path(paths[key]))
        rows.append(row)
    return rows


def _is_done(row, paths, done) -> bool:
    key = (row["participant_id"], row["source_session_id"], row["shift"], row["severity"])
    old = done.get(key)
    if old is None or str(old.get("seed")) != str(row["seed"]):
        return False
    return all(Path(path).is_file() for path in paths.values())


def _load(sources: Mapping[str, str], label_path: str) -> dict[str, Any]:
    nifti, images = {}, {}
    for key, path in sources.items():
        if not Path(path).is_file():
            raise DataError(path, f"{key} image not found")
        nifti[key] = nib.load(path)
        images[key] = np.asarray(nifti[key].dataobj, dtype=np.float32)
    if not Path(label_path).is_file():
        raise DataError(label_path, "label image not found")
    label = np.rint(np.asarray(nib.load(label_path).dataobj)).astype(np.uint8)
    for key, image in images.items():
        if image.shape != label.shape:
            raise DataError(
                sources[key],
                f"{key} has {image.shape} voxels but the label ({label_path}) has {label.shape}",
            )
    first = next(iter(nifti.values()))
    spacing = tuple(float(z) for z in first.header.get_zooms()[:3])
    return {"nifti": nifti, "images": images, "label": label, "spacing": spacing}


def _save(image: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(image.astype(np.float32), source.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    data = gzip.compress(out.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _shifted_path(out_dir: Path, participant: str, session: str, tag: str, key: str) -> Path:
    name = f"sub-{participant}_ses-{session}_desc-{tag}_{SUFFIXES[key]}.nii.gz"
    return out_dir / f"sub-{participant}" / f"ses-{session}" / "anat" / name


def _paths(paths: Mapping[str, str]) -> dict[str, str]:
    return {key: paths.get(key, TSV_MISSING) for key in MODALITIES}


def _given(path: object) -> bool:
    return path is not None and str(path).strip().lower() not in {"", "n/a", "nan", "none"}


def _as_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(list(rows), columns=list(SHIFTED_COLUMNS))
    return table.astype({"severity": float, "level": int, "scan_age": float})


def _write_table(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    table = _as_table(rows)
    atomic_write(path, lambda tmp: table.to_csv(tmp, sep="\t", index=False, na_rep=TSV_MISSING))


# --------------------------------------------------------------------------- the chapter's analysis

SCORE_COLUMNS: list[str] = [
    "model", "shift", "level", "severity", "participant_id", "session_id",
    "source_session_id", "scan_age", "dice_mean_nobg", "dice_mean",
]  # fmt: skip
"""Columns of :func:`score_shifts` (``robustness.tsv``)."""


def score_shifts(
    networks: Mapping[str, tuple[Any, Any]],
    shifted: pd.DataFrame,
    *,
    cache_dir: str | os.PathLike | None = None,
    sw_batch_size: int | None = None,
    backend: str = "torch",
    progress: bool = False,
) -> pd.DataFrame:
    """Dice of every network on every shifted session, through the study's one evaluation.

    Each network segments every row of ``shifted`` with :func:`neonb.experiment.evaluate`
    (its training's window size and overlap), reading the channels it was trained on, and
    each session's Dice is averaged over the classes (:func:`neonb.metrics.case_summary`).

    Args:
        networks: name → ``(network, TrainingConfig)``.
        shifted: rows of :func:`write_shifted_sessions`.
        cache_dir: the disk cache of pre-processed volumes.
        sw_batch_size: windows per forward pass (``None``: the default).
        backend: what runs the windows (:func:`neonb.experiment.evaluate`).
        progress: a progress bar per network.

    Returns:
        One row per network and shifted session, columns :data:`SCORE_COLUMNS`.
    """
    from neonb.experiment import evaluate, prepare_volumes
    from neonb.metrics import case_summary

    facts = shifted[["participant_id", "session_id", "source_session_id", "shift", "level",
                     "severity"]].astype({"participant_id": str, "session_id": str})  # fmt: skip
    tables = []
    for name, (network, config) in networks.items():
        volumes = prepare_volumes(
            shifted_records(shifted), cache_dir=cache_dir, channels=config.channels
        )
        result = evaluate(
            network, volumes, config, sw_batch_size=sw_batch_size, backend=backend,
            progress=progress,
        )  # fmt: skip
        cases = case_summary(result.per_class, by=("participant_id", "session_id", "scan_age"))
        cases = cases.astype({"participant_id": str, "session_id": str})
        tables.append(cases.merge(facts, on=["participant_id", "session_id"]).assign(model=name))
    return pd.concat(tables, ignore_index=True)[SCORE_COLUMNS]


def _with_clean_per_shift(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` with the clean rows repeated as level 0 of every shift."""
    clean = scores[scores["shift"] == CLEAN]
    shifts = [s for s in dict.fromkeys(scores["shift"]) if s != CLEAN]
    return pd.concat(
        [clean.assign(shift=s) for s in shifts] + [scores[scores["shift"] != CLEAN]],
        ignore_index=True,
    )


def severity_table(scores: pd.DataFrame, value: str = "dice_mean_nobg") -> pd.DataFrame:
    """Mean score per network, shift and severity, with a 95 % t-interval over sessions.

    The clean sessions are severity 0 of every shift.

    Returns:
        Columns ``model``, ``shift``, ``level``, ``severity``, ``sessions``, ``mean``,
        ``low``, ``high``.
    """
    rows = []
    keys = ["model", "shift", "level", "severity"]
    for key, group in _with_clean_per_shift(scores).groupby(keys, sort=False):
        mean, low, high = mean_interval(group[value])
        rows.append({**dict(zip(keys, key, strict=True)), "sessions": len(group), "mean": mean,
                     "low": low, "high": high})  # fmt: skip
    return pd.DataFrame(rows).sort_values(keys, kind="stable", ignore_index=True)


def _losses(scores: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per network, shift and session: the clean score minus the score at the top level."""
    ids = ["model", "participant_id", "source_session_id"]
    clean = scores[scores["shift"] == CLEAN].set_index(ids)[value].rename("clean")
    shifted = scores[scores["shift"] != CLEAN]
    top = shifted[_most_severe(shifted)]
    table = top.join(clean, on=ids).rename(columns={value: "severe"})
    return table.assign(loss=table["clean"] - table["severe"])


def _most_severe(table: pd.DataFrame) -> pd.Series:
    """Which rows are at their shift's most severe level (the clean rows, alone in their
    ``shift``, count as their own)."""
    return table["level"] == table.groupby("shift")["level"].transform("max")


def severe_losses(scores: pd.DataFrame, value: str = "dice_mean_nobg") -> pd.DataFrame:
    """How much each network loses from its clean score at each shift's most severe level.

    Returns:
        One row per network and shift: ``model``, ``shift``, ``severity``, ``clean`` and
        ``severe`` (means over the sessions), ``loss`` (mean of the per-session losses) with
        its 95 % t-interval ``loss_low``/``loss_high``.
    """
    rows = []
    for (model, shift), group in _losses(scores, value).groupby(["model", "shift"], sort=False):
        loss, low, high = mean_interval(group["loss"])
        rows.append({"model": model, "shift": shift, "severity": group["severity"].iloc[0],
                     "clean": group["clean"].mean(), "severe": group["severe"].mean(),
                     "loss": loss, "loss_low": low, "loss_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def _session_keys(table: pd.DataFrame) -> pd.Series:
    """``<participant>/<source session>``: a test session, under any shift."""
    return table["participant_id"].astype(str) + "/" + table["source_session_id"].astype(str)


def check_goals(
    scores: pd.DataFrame,
    *,
    candidate: str = "randomized",
    reference: str = "paper",
    max_loss: float = 0.05,
    clean_margin: float = 0.03,
    value: str = "dice_mean_nobg",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Decide the chapter's goals with the rules of :func:`neonb.statistics.check_claims`.

    Three families of claims, each Bonferroni-corrected on its own, all paired over the
    shifted sessions:

    * per shift, "``candidate`` loses at most ``max_loss`` at the most severe level": the
      paired t-test of (severe + ``max_loss``) against clean (holds when the loss is
      significantly below ``max_loss``);
    * per shift, "``reference`` loses more than ``candidate``": the paired t-test of the
      two networks' losses;
    * "``candidate`` is as good as ``reference`` on clean sessions": TOST with margin
      ``clean_margin``.

    Returns:
        The rows of :func:`~neonb.statistics.check_claims`, one per claim (index
        ``finding``), with ``family`` added.
    """
    losses = _losses(scores, value)
    families = []
    within, more = [], []
    rows = []
    for shift, group in losses.groupby("shift", sort=False):
        severity = group["severity"].iloc[0]
        mine = group[group["model"] == candidate]
        a, b = f"{candidate} at {shift} {severity:g} + {max_loss:g}", f"{candidate} clean"
        rows += [
            {"group": a, "session": s, "value": v + max_loss}
            for s, v in zip(_session_keys(mine), mine["severe"], strict=True)
        ]
        rows += [
            {"group": b, "session": s, "value": v}
            for s, v in zip(_session_keys(mine), mine["clean"], strict=True)
        ]
        within.append(
            Claim(
                f"{candidate} loses at most {max_loss:g} at {shift} {severity:g}",
                a,
                b,
                "greater",
                "neonb's goal",
            )
        )
        for model in (reference, candidate):
            net = group[group["model"] == model]
            rows += [
                {"group": f"{model} loss at {shift}", "session": s, "value": v}
                for s, v in zip(_session_keys(net), net["loss"], strict=True)
            ]
        more.append(Claim(f"{reference} loses more than {candidate} at {shift} {severity:g}",
                          f"{reference} loss at {shift}", f"{candidate} loss at {shift}",
                          "greater", "neonb's goal"))  # fmt: skip
    clean = scores[scores["shift"] == CLEAN]
    rows += [
        {"group": f"{m} clean", "session": s, "value": v}
        for m, s, v in zip(clean["model"], _session_keys(clean), clean[value], strict=True)
    ]
    table = pd.DataFrame(rows).drop_duplicates(["group", "session"])
    same = Claim(
        f"{candidate} is as good as {reference} on clean sessions (±{clean_margin:g})",
        f"{candidate} clean",
        f"{reference} clean",
        "equivalent",
        "neonb's goal",
    )
    for family, claims in (("loss at most", within), ("paper loses more", more),
                           ("clean", [same])):  # fmt: skip
        checked = check_claims(table, "value", claims, by="group", subject="session",
                               margin=clean_margin, alpha=alpha)  # fmt: skip
        families.append(checked.assign(family=family))
    return pd.concat(families)


def qc_study(
    model_dir: str | os.PathLike,
    shifted: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = False,
) -> pd.DataFrame:
    """Segment every shifted session as ``neonb segment --batch --tta --evaluate`` does.

    One batch over ``shifted.tsv`` (its session ids are unique per shift): each session is
    segmented with flip TTA, scored (QC) and flagged by the model folder's threshold, and
    compared with its reference labels. A batch run again resumes, as ``neonb segment
    --batch`` does.

    Args:
        model_dir: a model folder (:func:`neonb.export.export_run`).
        shifted: the ``shifted.tsv`` of :func:`write_shifted_sessions`.
        out_dir: the batch's derivatives folder.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        backend: what runs the windows (``neonb segment --backend``).
        progress: the batch's progress bar.

    Returns:
        One row per session: ``shift``, ``level``, ``severity``, ``participant_id``,
        ``session_id``, ``source_session_id``, ``qc_uncertainty``, ``qc_flag`` and
        ``dice_mean_nobg`` (of the TTA segmentation, over the tissues).

    Raises:
        DataError: naming the sessions that failed.
    """
    from neonb.labels import BACKGROUND_LABELS
    from neonb.metrics import class_column
    from neonb.segmentation import segment_batch

    result = segment_batch(
        model_dir, shifted, out_dir, evaluate=True, tta=True, device=device, backend=backend,
        progress=progress,
        echo=None if progress else (lambda _: None),
    )  # fmt: skip
    failed = result.summary[result.summary["status"] == "failed"]
    if len(failed):
        raise DataError(shifted, f"sessions failed: {'; '.join(failed['message'])}")
    ids = ["participant_id", "session_id"]
    dice = pd.read_csv(result.tables["dice"], sep="\t", dtype=str).set_index(ids)
    tissues = [class_column(i) for i in DRAWEM9 if i not in BACKGROUND_LABELS]
    mean = dice[tissues].astype(float).mean(axis=1).rename("dice_mean_nobg")
    summary = result.summary.astype({"participant_id": str, "session_id": str})
    table = read_tsv(Path(shifted)).astype({"level": int, "severity": float})
    table = table.merge(summary, on=ids).join(mean, on=ids)
    return table[["shift", "level", "severity", "participant_id", "session_id",
                  "source_session_id", "qc_uncertainty", "qc_flag", "dice_mean_nobg"]]  # fmt: skip


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` cases from the rest.

    The Mann-Whitney U statistic divided by the number of (positive, negative) pairs: the
    chance that a random positive case scores above a random negative one (ties count
    half). ``NaN`` without both kinds of case.
    """
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    return float(u) / (len(pos) * len(neg))


def qc_separation(qc: pd.DataFrame, *, dice_threshold: float) -> dict[str, Any]:
    """How well the QC score and flag single out segmentations below ``dice_threshold``.

    Returns:
        ``sessions``, ``below threshold`` (sessions whose Dice is below it), ``ROC AUC``
        of the QC score for those (:func:`roc_auc`), ``Spearman rho`` of QC score and Dice
        (negative: higher uncertainty, lower Dice), and of the model folder's flag:
        ``flagged``, ``sensitivity`` (bad ones flagged) and ``specificity`` (good ones
        not flagged); ``NaN`` where undefined.
    """
    bad = qc["dice_mean_nobg"] < dice_threshold
    score = qc["qc_uncertainty"].astype(float)
    flag = qc["qc_flag"].astype("boolean") if qc["qc_flag"].notna().all() else None
    rho = stats.spearmanr(score, qc["dice_mean_nobg"]).statistic if len(qc) > 2 else np.nan
    result = {
        "sessions": len(qc),
        "below threshold": int(bad.sum()),
        "ROC AUC": roc_auc(score, bad),
        "Spearman rho": float(rho),
        "flagged": int(flag.sum()) if flag is not None else np.nan,
        "sensitivity": float(flag[bad].mean()) if flag is not None and bad.any() else np.nan,
        "specificity": float((~flag[~bad]).mean()) if flag is not None and (~bad).any() else np.nan,
    }
    return result


def summary_text(
    losses: pd.DataFrame,
    goals: pd.DataFrame,
    separation: Mapping[str, Any],
    *,
    qc_dice: float,
    dataset: str,
    hardware: str,
) -> str:
    """The chapter's closing paragraph, from its tables (:func:`severe_losses`,
    :func:`check_goals`, :func:`qc_separation`)."""
    clean = losses.groupby("model", sort=False)["clean"].first()
    worst = losses.loc[losses.groupby("model", sort=False)["loss"].idxmax()]
    parts = [
        f"On the {dataset} ({hardware}), clean Dice (no BG): "
        + ", ".join(f"{model} {value:.3f}" for model, value in clean.items())
        + ". Largest loss at a shift's most severe level: "
        + ", ".join(
            f"{row.model} {row.loss:.3f} ({row.shift} {row.severity:g})"
            for row in worst.itertuples()
        )
        + f". Goals: {(goals['verdict'] == 'holds').sum()} of {len(goals)} hold "
        + "("
        + ", ".join(f"{n} {v}" for v, n in goals["verdict"].value_counts().items())
        + ").",
        f"QC: {int(separation['below threshold'])} of {int(separation['sessions'])} TTA "
        "segmentations "
        f"of the paper's network fell below Dice {qc_dice:g}; the QC score separated them "
        f"with ROC AUC {separation['ROC AUC']:.2f} (Spearman rho with Dice "
        f"{separation['Spearman rho']:.2f}).",
    ]
    return " ".join(parts)


def select_levels(shifted: pd.DataFrame, levels: str, path: str | os.PathLike) -> Path:
    """Write the rows of ``shifted`` at some levels as a batch manifest.

    Args:
        shifted: rows of :func:`write_shifted_sessions`.
        levels: ``"all"`` (every row) or ``"severe"`` (the clean rows and each shift's most
            severe level).
        path: the TSV to write (atomically).

    Returns:
        ``path``.

    Raises:
        ConfigError: for another ``levels``.
    """
    if levels not in ("all", "severe"):
        raise ConfigError(f"levels must be 'all' or 'severe', got {levels!r}")
    rows = shifted
    if levels == "severe":
        rows = shifted[(shifted["shift"] == CLEAN) | _most_severe(shifted)]
    path = Path(path)
    atomic_write(path, lambda tmp: rows.to_csv(tmp, sep="\t", index=False, na_rep=TSV_MISSING))
    return path
