"""Read a dHCP third-release anatomical folder into a manifest of sessions.

Richter & Fetit (2022, §3.1) start from the scans of the developing Human Connectome
Project's third release and keep the 709 "complete data units": sessions that have a T1w,
a T2w, a drawem9 segmentation and their minimal metadata (the scan age). This module does
that bookkeeping. :func:`read_manifest` walks a release laid out as the dHCP distributes it
(887 neonatal sessions of 783 participants)::

    ROOT/participants.tsv                       participant_id, birth_age, sex (or gender)
    ROOT/combined.tsv                           optional: one row per session, fills gaps
    ROOT/sub-<id>/sub-<id>_sessions.tsv         session_id, scan_age
    ROOT/derivatives/dhcp_anat_pipeline/sub-<id>/ses-<ses>/anat/
        sub-<id>_ses-<ses>_T2w.nii.gz                  T2w, as reconstructed
        sub-<id>_ses-<ses>_desc-restore_T2w.nii.gz     T2w, bias-corrected
        sub-<id>_ses-<ses>_T1w.nii.gz                  T1w on the T2w grid
        sub-<id>_ses-<ses>_desc-restore_T1w.nii.gz     T1w on the T2w grid, bias-corrected
        sub-<id>_ses-<ses>_desc-drawem9_dseg.nii.gz    drawem9 tissue labels 0-9
        sub-<id>_ses-<ses>_desc-brain_mask.nii.gz      brain mask, 0 and 1

``ROOT`` may also be the ``derivatives/dhcp_anat_pipeline`` folder itself, with the tables
next to its ``sub-*`` folders (the layout :mod:`neonb.phantom` writes) or two levels up;
``sub-<id>_sessions.tsv`` may sit next to the images or in ``ROOT/sub-<id>/``.

Which images a session's row names is a parameter, ``images``: ``"restore"`` (the
bias-corrected ``desc-restore`` pair; also accepted under the older name
``desc-restore_space-T2w_T1w``) or ``"plain"`` (``_T1w``/``_T2w``, what the paper's authors
extracted). T1w and T2w are always of one kind: a session lacking either image of the chosen
kind is incomplete, never filled in with the other kind. The brain mask is read into its
own column; ``brain_mask="apply"`` makes it a required image, and :func:`to_data_dicts`
then hands it to the transforms, which zero the image outside it.

:func:`read_manifest` returns one row per session with the reason it is incomplete, if it
is. With ``check=True`` every image is also opened and checked in the spirit of nnU-Net's
``verify_dataset_integrity``: each problem is recorded against its session, naming the
file, and nothing is raised for a bad image. The per-image checks (:func:`load_nifti`,
:func:`check_geometry`, :func:`check_image_3d`, :func:`check_finite`, :func:`check_labels`,
:func:`check_binary`,
:func:`check_same_shape`, :func:`check_same_affine`) raise :class:`~neonb.errors.DataError`
on their own, so other code can reuse them for single-file messages.

Ages are in weeks: ``scan_age`` is postmenstrual age (PMA) at the scan, ``birth_age`` the
gestational age at birth. An infant is preterm when born before
:data:`PRETERM_BIRTH_AGE_WEEKS` (37) weeks.

Example:
    >>> manifest = read_manifest("data/dhcp_rel3", images="plain", check=True)  # doctest: +SKIP
    >>> print(summarize_manifest(manifest))  # doctest: +SKIP
    found 887 sessions of 783 participants
    ...
    >>> data_dicts = to_data_dicts(manifest)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import stat
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from tqdm import tqdm

from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write
from neonb.labels import DRAWEM9

StrPath = str | os.PathLike
"""A file or folder name, as ``str`` or :class:`pathlib.Path`."""

__all__ = [
    "AFFINE_ATOL_MM",
    "BRAIN_MASK_POLICIES",
    "MAX_AXIS_VOXELS",
    "MAX_IMAGE_VOXELS",
    "IMAGE_COLUMNS",
    "IMAGE_KINDS",
    "MANIFEST_COLUMNS",
    "PRETERM_BIRTH_AGE_WEEKS",
    "ManifestSummary",
    "check_binary",
    "check_brain_mask_policy",
    "check_finite",
    "check_geometry",
    "geometry_warnings",
    "check_image_3d",
    "check_image_kind",
    "check_labels",
    "check_same_affine",
    "check_same_shape",
    "check_session",
    "find_session_images",
    "image_suffixes",
    "load_manifest",
    "load_nifti",
    "normalise_participant_id",
    "normalise_session_id",
    "read_manifest",
    "reason_categories",
    "session_filename",
    "session_record",
    "summarize_manifest",
    "to_data_dicts",
    "write_manifest",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

MANIFEST_COLUMNS: tuple[str, ...] = (
    "participant_id",
    "session_id",
    "scan_age",
    "birth_age",
    "sex",
    "preterm",
    "t1w",
    "t2w",
    "dseg",
    "brain_mask",
    "complete",
    "reason",
)
"""Columns of a manifest, in order."""

OPTIONAL_MANIFEST_COLUMNS: tuple[str, ...] = ("brain_mask",)
"""Manifest columns a table written before neonb read brain masks may lack (read as ``""``)."""

IMAGE_COLUMNS: tuple[str, ...] = ("t1w", "t2w", "dseg", "brain_mask")
"""Manifest columns that hold image paths; also the keys :func:`check_session` knows."""

REQUIRED_IMAGES: tuple[str, ...] = ("t1w", "t2w", "dseg")
"""Images every complete session has; ``brain_mask="apply"`` adds ``"brain_mask"``."""

DISPLAY_NAMES: dict[str, str] = {
    "t1w": "T1w",
    "t2w": "T2w",
    "dseg": "dseg",
    "brain_mask": "brain mask",
}
"""How each image is named in reasons."""

IMAGE_KINDS: tuple[str, ...] = ("restore", "plain")
"""Values of ``images``: the bias-corrected ``desc-restore`` pair, or the plain one."""

BRAIN_MASK_POLICIES: tuple[str, ...] = ("ignore", "apply")
"""Values of ``brain_mask``: read the mask but do not use it, or require and apply it."""

INTENSITY_SUFFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "restore": {
        "t1w": ("desc-restore_T1w", "desc-restore_space-T2w_T1w"),
        "t2w": ("desc-restore_T2w",),
    },
    "plain": {"t1w": ("T1w",), "t2w": ("T2w",)},
}
"""Accepted name endings of the T1w and T2w of each kind, preferred (the release's) first.
``desc-restore_space-T2w_T1w`` is the name neonb wrote before it followed the release."""

LABEL_SUFFIXES: dict[str, tuple[str, ...]] = {
    "dseg": ("desc-drawem9_dseg",),
    "brain_mask": ("desc-brain_mask",),
}
"""Accepted name endings of the drawem9 labels and the brain mask."""

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
"""Accepted file extensions, preferred first."""

DERIVATIVES_DIR = Path("derivatives", "dhcp_anat_pipeline")
"""Where a release folder keeps the anatomical pipeline's ``sub-*/ses-*/anat`` images."""

REFERENCE_IMAGE = "t2w"
"""Image whose grid the others must share: drawem9 is computed on the T2w (paper §3.1)."""

PRETERM_BIRTH_AGE_WEEKS = 37.0
"""Gestational age at birth (weeks) below which an infant counts as preterm (paper §3.1)."""

AFFINE_ATOL_MM = 1e-3
"""Largest difference (mm) between two voxel-to-world affines that still counts as equal."""

PARTICIPANTS_TSV = "participants.tsv"
COMBINED_TSV = "combined.tsv"
RELEASE_HINT = (
    "expected the dHCP release folder (participants.tsv, derivatives/dhcp_anat_pipeline/"
    "sub-*/) or its derivatives/dhcp_anat_pipeline folder"
)
REASON_SEPARATOR = "; "
TSV_MISSING = "n/a"
"""How a manifest TSV spells a missing value (the BIDS convention)."""

MISSING_TEXT = frozenset({"", "n/a", "na", "nan", "none", "null"})
"""Cell values (lower-cased) that mean "unknown" in a dHCP or hand-edited TSV."""

MAX_VALUES_SHOWN = 5
"""How many offending voxel values a label message quotes."""

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
NIFTI_MAGIC_OFFSET = {NIFTI1_HEADER_BYTES: 344, NIFTI2_HEADER_BYTES: 4}
NIFTI_SINGLE_FILE_MAGIC = {NIFTI1_HEADER_BYTES: b"n+1\x00", NIFTI2_HEADER_BYTES: b"n+2\x00"}
NIFTI_IMAGE_CLASS: dict[int, type[nib.Nifti1Image]] = {
    NIFTI1_HEADER_BYTES: nib.Nifti1Image,
    NIFTI2_HEADER_BYTES: nib.Nifti2Image,
}

MAX_IMAGE_VOXELS = 4 * 512**3
"""Most voxels (all axes together) an image may hold: four 512³ volumes, far beyond any
neonatal scan (the dHCP grid is 217 × 290 × 290); checked from the header before reading."""

MAX_AXIS_VOXELS = 2048
"""Most voxels along any one axis (checked from the header before reading)."""

MAX_HEADER_EXTENSION_BYTES = 64 * 2**20
"""Most bytes between the header and the image data (NIfTI extensions)."""

MAX_TRAILING_BYTES = 64 * 2**20
"""Most bytes a file may hold after the image data its header describes; the rest of a
longer (decompressed) stream is not read."""

READ_CHUNK_BYTES = 2**20
"""Bytes read at a time past the image data, to check a gzip stream to its end."""

VOXEL_SIZE_RTOL = 1e-3
"""Relative tolerance between the header's ``pixdim`` and the affine's voxel sizes."""

SINGULAR_AFFINE_RTOL = 1e-6
"""An affine whose |det| is below this fraction of the product of its column norms is
singular: its voxel axes do not span 3D space."""

_AFFINE_FIELDS = {
    "sform": "the sform (srow_x, srow_y, srow_z)",
    "qform": "the qform (quatern_b/c/d, qoffset_x/y/z, pixdim)",
    "pixdim": "pixdim (no sform or qform code set)",
}

# What nibabel raises on a header or data block it cannot make sense of.
_NIBABEL_PARSE_ERRORS = (ImageFileError, HeaderDataError, ValueError, TypeError)


# --------------------------------------------------------------------------------------
# Names and ids
# --------------------------------------------------------------------------------------


def normalise_participant_id(value: object) -> str:
    """``"sub-CC00050XX01"`` or ``" CC00050XX01"`` -> ``"CC00050XX01"``."""
    return _strip_prefix(str(value).strip(), "sub-")


def normalise_session_id(value: object) -> str:
    """``"ses-7201"`` or ``"7201"`` -> ``"7201"``."""
    return _strip_prefix(str(value).strip(), "ses-")


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def check_image_kind(images: object) -> str:
    """Return ``images`` if it is one of :data:`IMAGE_KINDS`, else raise a ConfigError."""
    if images not in IMAGE_KINDS:
        raise ConfigError(
            f"images must be one of {list(IMAGE_KINDS)} (bias-corrected desc-restore images, "
            f"or the plain T1w/T2w), but found {images!r}"
        )
    return str(images)


def check_brain_mask_policy(brain_mask: object) -> str:
    """Return ``brain_mask`` if it is one of :data:`BRAIN_MASK_POLICIES`, else raise."""
    if brain_mask not in BRAIN_MASK_POLICIES:
        raise ConfigError(
            f"brain_mask must be one of {list(BRAIN_MASK_POLICIES)}, but found {brain_mask!r}"
        )
    return str(brain_mask)


def image_suffixes(images: str = "restore") -> dict[str, tuple[str, ...]]:
    """Accepted name endings of every image of a session, preferred first.

    Args:
        images: ``"restore"`` or ``"plain"`` (:data:`IMAGE_KINDS`): which T1w and T2w.

    Returns:
        ``{"t1w": (...), "t2w": (...), "dseg": (...), "brain_mask": (...)}``, e.g.
        ``("desc-restore_T1w", "desc-restore_space-T2w_T1w")`` for the restored T1w.

    Raises:
        ConfigError: when ``images`` is not one of :data:`IMAGE_KINDS`.
    """
    return {**INTENSITY_SUFFIXES[check_image_kind(images)], **LABEL_SUFFIXES}


def session_filename(
    participant_id: str,
    session_id: str,
    image: str,
    extension: str = ".nii.gz",
    *,
    images: str = "restore",
) -> str:
    """The dHCP release's file name of one image of a session.

    Args:
        participant_id: bare or ``sub-`` prefixed participant id.
        session_id: bare or ``ses-`` prefixed session id.
        image: one of :data:`IMAGE_COLUMNS` (``"t1w"``, ``"t2w"``, ``"dseg"``,
            ``"brain_mask"``).
        extension: ``".nii.gz"`` or ``".nii"``.
        images: ``"restore"`` or ``"plain"``: the kind of T1w and T2w.

    Returns:
        For example ``"sub-CC1_ses-7_desc-restore_T2w.nii.gz"``, or
        ``"sub-CC1_ses-7_T2w.nii.gz"`` with ``images="plain"``.

    Raises:
        ConfigError: when ``images`` is not one of :data:`IMAGE_KINDS`.
    """
    return _filename(participant_id, session_id, image_suffixes(images)[image][0], extension)


def _filename(participant_id: str, session_id: str, suffix: str, extension: str) -> str:
    pid = normalise_participant_id(participant_id)
    sid = normalise_session_id(session_id)
    return f"sub-{pid}_ses-{sid}_{suffix}{extension}"


def find_session_images(
    anat_dir: StrPath, participant_id: str, session_id: str, *, images: str = "restore"
) -> dict[str, Path | None]:
    """Find the T1w, T2w, dseg and brain mask files of one session.

    Args:
        anat_dir: the session's ``anat`` folder.
        participant_id: bare or prefixed participant id.
        session_id: bare or prefixed session id.
        images: ``"restore"`` or ``"plain"``: which T1w and T2w to look for. The other
            kind is never returned in their place.

    Returns:
        ``{"t1w": path or None, "t2w": ..., "dseg": ..., "brain_mask": ...}``; ``None``
        where no accepted name (:func:`image_suffixes` x :data:`NIFTI_EXTENSIONS`) exists.

    Raises:
        ConfigError: when ``images`` is not one of :data:`IMAGE_KINDS`.
    """
    anat_dir = Path(anat_dir)
    suffixes = image_suffixes(images)
    try:
        present = {entry.name for entry in os.scandir(anat_dir) if entry.is_file()}
    except OSError:  # no such folder, or not readable: nothing found
        present = set()
    found: dict[str, Path | None] = {}
    for image, endings in suffixes.items():
        names = (
            _filename(participant_id, session_id, ending, extension)
            for ending in endings
            for extension in NIFTI_EXTENSIONS
        )
        found[image] = next((anat_dir / name for name in names if name in present), None)
    return found


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders ``"9" < "10"`` so a subject's sessions sort by number."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# --------------------------------------------------------------------------------------
# Reading one NIfTI file
# --------------------------------------------------------------------------------------


def load_nifti(path: StrPath) -> nib.Nifti1Image:
    """Open a NIfTI-1 or NIfTI-2 file, read all of it and say precisely what is wrong.

    The path must be a regular file (a named pipe, a device such as ``/dev/zero`` or a link
    to one is refused before it is opened). The header is read and checked first: an image
    larger than :data:`MAX_AXIS_VOXELS` along an axis or :data:`MAX_IMAGE_VOXELS` in all is
    refused before its data are read, and no more of a (decompressed) stream is read than
    the header describes plus :data:`MAX_TRAILING_BYTES`. The whole stream is then read once,
    so a broken gzip stream or a file cut short is caught here rather than in a later
    ``get_fdata()``; the voxel-to-world geometry is checked with :func:`check_geometry`. The
    returned image holds its data in memory (as ``np.asanyarray(img.dataobj)`` gives it: the
    on-disk type, or float when the header scales it) and remembers ``path`` as its file name.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        The image, with shape ``(X, Y, Z)`` for a 3D file.

    Raises:
        DataError: naming ``path`` with one of these problems: "file not found", "is a
            folder, not a file", "is a named pipe (FIFO), not a regular file" (or a device,
            or a socket), "not a NIfTI file: ..." (wrong extension, wrong header size or
            magic, unparsable header), "empty file", "corrupt gzip: ..." (not gzip data,
            bad CRC, invalid deflate stream), "truncated: ..." (gzip stream, header or image
            data ends early), "dim ... voxels ...: neonb reads at most ..." (too large),
            "holds more than ... beyond the image data", a non-finite or singular affine
            (:func:`check_geometry`), "cannot be read: ..." (permissions and other I/O
            errors) or "cannot read the image data: ..." (e.g. an unsupported voxel type).

    Example:
        >>> img = load_nifti("sub-1_ses-1_desc-restore_T2w.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    _check_nifti_path(path)
    raw, header_bytes = _read_raw(path)
    image_class = NIFTI_IMAGE_CLASS[header_bytes]
    try:
        on_disk = image_class.from_bytes(raw)
    except _NIBABEL_PARSE_ERRORS as err:
        raise DataError(path, f"not a NIfTI file: {err}") from err
    _check_data_length(on_disk, len(raw), path)
    on_disk.set_filename(str(path))
    check_geometry(on_disk)  # before nibabel decomposes the affine into a qform
    try:
        data = np.asanyarray(on_disk.dataobj)
    except (*_NIBABEL_PARSE_ERRORS, OSError) as err:
        raise DataError(path, f"cannot read the image data: {err}") from err
    image = image_class(data, on_disk.affine, on_disk.header)
    image.set_filename(str(path))
    return image


_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_nifti_path(path: Path) -> None:
    """Refuse anything but an existing regular file with a NIfTI name, before opening it."""
    try:
        status = path.stat()  # follows links: a link to /dev/zero is a character device
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except OSError as err:
        raise DataError(path, f"cannot be read: {err.strerror or err}") from err
    if stat.S_ISDIR(status.st_mode):
        raise DataError(path, "is a folder, not a file")
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(status.st_mode)), "special")
        if path.is_symlink():
            kind = f"a link to {os.path.realpath(path)}, {kind}"
        raise DataError(path, f"is {kind}, not a regular file", hint="give a .nii or .nii.gz file")
    if not path.name.endswith(NIFTI_EXTENSIONS):
        raise DataError(path, "not a NIfTI file: the name must end in .nii or .nii.gz")


def _read_raw(path: Path) -> tuple[bytes, int]:
    """The header and image bytes, decompressed when the name ends in ``.gz``, and the
    header size (348 or 540)."""
    try:
        with open(path, "rb") as stream:
            start = stream.read(4)
            if not start:
                raise DataError(path, "empty file (0 bytes)")
            if not path.name.endswith(".gz"):
                if start.startswith(GZIP_MAGIC):
                    raise DataError(
                        path, "not a NIfTI file: it is gzip-compressed", hint="rename it to .nii.gz"
                    )
                stream.seek(0)
                return _read_nifti_stream(stream, path)
        if not start.startswith(GZIP_MAGIC):
            raise DataError(
                path,
                f"corrupt gzip: not gzip data (starts with {start!r})",
                hint="rename it to .nii" if _looks_like_nifti_header(start) else None,
            )
        with gzip.open(path, "rb") as stream:
            return _read_nifti_stream(stream, path)
    except EOFError as err:
        raise DataError(path, f"truncated: the gzip stream ends early ({err})") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(path, f"corrupt gzip: {err}") from err
    except OSError as err:
        raise DataError(path, f"cannot be read: {err}") from err


def _read_nifti_stream(stream: IO[bytes], path: Path) -> tuple[bytes, int]:
    """Header, then as many bytes as the header says; the rest is read only to its end."""
    head = _read_up_to(stream, NIFTI2_HEADER_BYTES)
    header_bytes = _nifti_header_size(head, path)
    needed = _bytes_needed(head[:header_bytes], header_bytes, path)
    raw = head + _read_up_to(stream, needed - len(head))
    trailing = 0
    while chunk := stream.read(READ_CHUNK_BYTES):  # to the end, so gzip checks its CRC
        trailing += len(chunk)
        if trailing > MAX_TRAILING_BYTES:
            raise DataError(
                path,
                f"holds more than {MAX_TRAILING_BYTES // 2**20} MiB beyond the "
                f"{needed} bytes of header and image data its header describes",
                hint="its dim or datatype field does not describe the data",
            )
    return raw, header_bytes


def _read_up_to(stream: IO[bytes], n_bytes: int) -> bytes:
    """At most ``n_bytes`` from ``stream`` (fewer at its end)."""
    parts: list[bytes] = []
    left = n_bytes
    while left > 0 and (chunk := stream.read(left)):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _bytes_needed(header_block: bytes, header_bytes: int, path: Path) -> int:
    """Bytes of header, extensions and image data, from the header; refuse a huge image."""
    header_class = NIFTI_IMAGE_CLASS[header_bytes].header_class
    try:
        header = header_class.from_fileobj(io.BytesIO(header_block))
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except _NIBABEL_PARSE_ERRORS as err:
        raise DataError(path, f"not a NIfTI file: {err}") from err
    if shape and max(shape) > MAX_AXIS_VOXELS:
        raise DataError(
            path,
            f"dim {shape} has {max(shape)} voxels along an axis: neonb reads at most "
            f"{MAX_AXIS_VOXELS}",
            hint="no brain scan is that large; the header is wrong",
        )
    n_voxels = math.prod(shape)
    if n_voxels > MAX_IMAGE_VOXELS:
        raise DataError(
            path,
            f"dim {shape} makes {n_voxels} voxels: neonb reads at most {MAX_IMAGE_VOXELS} "
            "(four 512³ volumes)",
            hint="no brain scan is that large; the header is wrong",
        )
    extension_bytes = offset - header_bytes
    if extension_bytes > MAX_HEADER_EXTENSION_BYTES:
        raise DataError(
            path,
            f"vox_offset {offset} puts the image data {extension_bytes} bytes after the "
            f"header: neonb reads at most {MAX_HEADER_EXTENSION_BYTES} bytes of extensions",
        )
    return max(offset, header_bytes) + n_voxels * itemsize


def _header_sizes(start: bytes) -> set[int]:
    """The ``sizeof_hdr`` field read both little- and big-endian."""
    return {struct.unpack(f"{order}i", start[:4])[0] for order in "<>"}


def _looks_like_nifti_header(start: bytes) -> bool:
    return len(start) >= 4 and bool(_header_sizes(start) & set(NIFTI_IMAGE_CLASS))


def _nifti_header_size(raw: bytes, path: Path) -> int:
    """348 (NIfTI-1) or 540 (NIfTI-2) from the ``sizeof_hdr`` field, after a magic check."""
    if len(raw) < 4:
        raise DataError(path, f"truncated: only {len(raw)} bytes, too short for a NIfTI header")
    known = _header_sizes(raw) & set(NIFTI_IMAGE_CLASS)
    if not known:
        # A gzip stream inside the gzip stream: someone compressed an already compressed file.
        twice = "it is compressed twice, gunzip it once" if raw[:2] == GZIP_MAGIC else None
        raise DataError(
            path,
            "not a NIfTI file: the header size field is neither 348 (NIfTI-1) nor 540 (NIfTI-2)",
            hint=twice,
        )
    header_bytes = known.pop()
    if len(raw) < header_bytes:
        raise DataError(
            path, f"truncated: the header needs {header_bytes} bytes, the file holds {len(raw)}"
        )
    offset = NIFTI_MAGIC_OFFSET[header_bytes]
    magic = raw[offset : offset + 4]
    if magic != NIFTI_SINGLE_FILE_MAGIC[header_bytes]:
        expected = NIFTI_SINGLE_FILE_MAGIC[header_bytes]
        raise DataError(
            path, f"not a NIfTI file: the header magic is {magic!r}, expected {expected!r}"
        )
    return header_bytes


def _check_data_length(image: nib.Nifti1Image, n_bytes: int, path: Path) -> None:
    """Raise when the (decompressed) file is shorter than the header says it must be."""
    # The proxy, not the header, knows the offset: nibabel resets the header's copy.
    proxy = image.dataobj
    offset = int(proxy.offset)
    needed = int(np.prod(proxy.shape, dtype=np.int64)) * proxy.dtype.itemsize
    if n_bytes < offset + needed:
        raise DataError(
            path,
            f"truncated: the image data needs {needed} bytes after byte {offset}, "
            f"the file holds {max(n_bytes - offset, 0)}",
        )


# --------------------------------------------------------------------------------------
# Checks on one image
# --------------------------------------------------------------------------------------


def _image_name(image: SpatialImage) -> str:
    return image.get_filename() or "<in-memory image>"


def check_image_3d(image: SpatialImage) -> None:
    """Raise unless ``image`` has exactly three axes ``(X, Y, Z)``.

    Raises:
        DataError: naming the image's file, e.g. "has shape (6, 7, 8, 2): 4 axes, expected
            a 3D image".
    """
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3:
        raise DataError(
            _image_name(image), f"has shape {shape}: {len(shape)} axes, expected a 3D image"
        )


def _check_real_numbers(image: SpatialImage, data: np.ndarray) -> None:
    """Refuse voxels that are not real numbers (text, booleans, complex values)."""
    if np.iscomplexobj(data):
        raise DataError(
            _image_name(image), f"has complex voxels of type {data.dtype}: expected real values"
        )
    if not np.issubdtype(data.dtype, np.number):
        raise DataError(_image_name(image), f"has non-numeric voxels of type {data.dtype}")


def check_finite(image: SpatialImage) -> None:
    """Raise unless every voxel is a real number that stays finite as float32.

    Intensities are converted to float32 for the network, so a finite value beyond the
    float32 range (about 3.4e38) counts as infinite.

    Raises:
        DataError: naming the image's file: non-numeric or complex voxels, the number of
            NaN and infinite voxels, or the number beyond the float32 range.
    """
    data = np.asanyarray(image.dataobj)
    _check_real_numbers(image, data)
    if np.issubdtype(data.dtype, np.integer):
        return  # every integer type fits the float32 range
    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        raise DataError(_image_name(image), f"holds {n_nan} NaN and {n_inf} infinite voxels")
    if data.dtype.itemsize > np.dtype(np.float32).itemsize:
        too_large = np.abs(data) > np.finfo(np.float32).max
        n_large = int(too_large.sum())
        if n_large:
            example = float(data[too_large].flat[0])
            raise DataError(
                _image_name(image),
                f"holds {n_large} voxel{'s' if n_large != 1 else ''} beyond the float32 range "
                f"(e.g. {example:g}), which become infinite as float32",
                hint="rescale the intensities",
            )


def _affine_source(header: Any) -> str:
    """Which header fields give nibabel's affine: ``"sform"``, ``"qform"`` or ``"pixdim"``."""
    try:
        if int(header["sform_code"]) > 0:
            return "sform"
        if int(header["qform_code"]) > 0:
            return "qform"
    except (KeyError, ValueError):
        pass
    return "pixdim"


def _fmt_mm(values: Iterable[float]) -> str:
    return " x ".join(f"{v:g}" for v in values) + " mm"


def check_geometry(image: SpatialImage) -> None:
    """Raise unless the image's voxel-to-world affine is usable.

    The affine is the one nibabel (and every NIfTI reader) uses: the sform when its code is
    set, else the qform, else ``pixdim``. It must be finite and non-singular (its three voxel
    axes span 3D space), and the voxel sizes in ``pixdim`` must be finite numbers.

    Raises:
        DataError: naming the image's file and the header field, e.g. "the sform (srow_x,
            srow_y, srow_z) holds NaN or infinite values" or "... is singular".
    """
    name = _image_name(image)
    header = image.header
    n_axes = min(len(image.shape), 3)
    if "pixdim" in header:
        pixdim = np.asarray(header["pixdim"][1 : n_axes + 1], dtype=float)
        if not np.isfinite(pixdim).all():
            values = ", ".join(f"{v:g}" for v in pixdim)
            raise DataError(name, f"pixdim holds voxel sizes [{values}]: expected finite numbers")
    source = _affine_source(header)
    field = _AFFINE_FIELDS[source] if "pixdim" in header else "the affine"
    try:
        affine = np.asarray(image.affine, dtype=float)
    except (*_NIBABEL_PARSE_ERRORS, np.linalg.LinAlgError) as err:
        raise DataError(name, f"{field} cannot be read: {err}") from err
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(name, f"{field} holds NaN or infinite values")
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    determinant = abs(float(np.linalg.det(affine[:3, :3])))
    if not norms.all() or determinant <= SINGULAR_AFFINE_RTOL * float(np.prod(norms)):
        rank = int(np.linalg.matrix_rank(affine[:3, :3]))
        raise DataError(
            name,
            f"{field} is singular (rank {rank}): its voxel axes do not span 3D space "
            f"(voxel sizes {_fmt_mm(norms)})",
        )


def geometry_warnings(image: SpatialImage) -> list[str]:
    """Header fields that disagree with the affine nibabel uses, as sentences.

    Voxel sizes come from the affine (the norms of its columns), the only source of truth;
    this lists ``pixdim`` voxel sizes that differ from them by more than
    :data:`VOXEL_SIZE_RTOL` (relative), and a qform that differs from the sform (both set)
    by more than :data:`AFFINE_ATOL_MM`.

    Returns:
        One sentence per disagreement, naming the fields; empty when the header agrees.
    """
    header = image.header
    if "pixdim" not in header:
        return []
    warnings: list[str] = []
    source = _affine_source(header)
    n_axes = min(len(image.shape), 3)
    sizes = np.sqrt((np.asarray(image.affine, dtype=float)[:3, :n_axes] ** 2).sum(axis=0))
    pixdim = np.asarray(header["pixdim"][1 : n_axes + 1], dtype=float)
    if source != "pixdim" and not np.allclose(pixdim, sizes, rtol=VOXEL_SIZE_RTOL, atol=0):
        warnings.append(
            f"pixdim gives {_fmt_mm(pixdim)} voxels but the {source} gives {_fmt_mm(sizes)}; "
            f"neonb uses the {source}'s (the affine every NIfTI reader uses)"
        )
    if source == "sform" and int(header["qform_code"]) > 0:
        try:
            qform = np.asarray(header.get_qform(), dtype=float)
        except (*_NIBABEL_PARSE_ERRORS, np.linalg.LinAlgError):
            qform = np.full((4, 4), np.nan)
        difference = float(np.max(np.abs(qform - np.asarray(image.affine, dtype=float))))
        if not np.isfinite(difference):
            warnings.append("the qform holds NaN or infinite values; neonb uses the sform")
        elif difference > AFFINE_ATOL_MM:
            warnings.append(
                f"the sform and the qform disagree by up to {difference:.4g} mm; neonb uses "
                "the sform (as nibabel does)"
            )
    return warnings


def check_labels(image: SpatialImage, labels: Iterable[int] = tuple(DRAWEM9)) -> None:
    """Raise when a segmentation holds a voxel value that is not one of ``labels``.

    Non-integer, NaN and infinite values count as invalid, whatever the voxel type.

    Args:
        image: a segmentation, e.g. ``*_desc-drawem9_dseg.nii.gz``.
        labels: the allowed values; by default the drawem9 labels 0-9.

    Raises:
        DataError: naming the image's file, how many voxels are invalid and up to
            :data:`MAX_VALUES_SHOWN` of the offending values, e.g. "holds values outside
            the labels 0-9 in 3 voxels (e.g. 10, 12)".
    """
    allowed = np.asarray(sorted(labels))
    data = np.asanyarray(image.dataobj)
    _check_real_numbers(image, data)
    invalid = ~np.isin(data, allowed)
    n_invalid = int(invalid.sum())
    if n_invalid:
        shown = ", ".join(f"{value:g}" for value in np.unique(data[invalid])[:MAX_VALUES_SHOWN])
        raise DataError(
            _image_name(image),
            f"holds values outside the labels {_describe_labels(allowed)} in {n_invalid} "
            f"voxel{'s' if n_invalid != 1 else ''} (e.g. {shown})",
        )


def check_binary(image: SpatialImage) -> None:
    """Raise when a mask holds a voxel value other than 0 and 1.

    Raises:
        DataError: naming the image's file, how many voxels are neither 0 nor 1 and up to
            :data:`MAX_VALUES_SHOWN` of their values, e.g. "is not binary: holds values other
            than 0 and 1 in 2 voxels (e.g. 2, 255)".
    """
    data = np.asanyarray(image.dataobj)
    if not np.issubdtype(data.dtype, np.number):
        raise DataError(_image_name(image), f"has non-numeric voxels of type {data.dtype}")
    invalid = (data != 0) & (data != 1)
    n_invalid = int(invalid.sum())
    if n_invalid:
        shown = ", ".join(f"{value:g}" for value in np.unique(data[invalid])[:MAX_VALUES_SHOWN])
        raise DataError(
            _image_name(image),
            f"is not binary: holds values other than 0 and 1 in {n_invalid} "
            f"voxel{'s' if n_invalid != 1 else ''} (e.g. {shown})",
        )


def _describe_labels(allowed: np.ndarray) -> str:
    """``0-9`` for a contiguous range, else the list."""
    if len(allowed) > 1 and np.array_equal(allowed, np.arange(allowed[0], allowed[-1] + 1)):
        return f"{allowed[0]}-{allowed[-1]}"
    return "{" + ", ".join(str(v) for v in allowed) + "}"


def check_same_shape(image: SpatialImage, reference: SpatialImage) -> None:
    """Raise unless ``image`` and ``reference`` have the same shape.

    Raises:
        DataError: naming ``image``'s file, both shapes and ``reference``'s file.
    """
    if tuple(image.shape) != tuple(reference.shape):
        raise DataError(
            _image_name(image),
            f"shape {_shape(image)} differs from {_shape(reference)} of {_image_name(reference)}",
        )


def check_same_affine(
    image: SpatialImage,
    reference: SpatialImage,
    atol_mm: float = AFFINE_ATOL_MM,
) -> None:
    """Raise unless the voxel-to-world affines (4 x 4) agree within ``atol_mm``.

    Args:
        image: the image to check.
        reference: the image it must be aligned with.
        atol_mm: largest tolerated absolute difference of any affine entry, in mm.

    Raises:
        DataError: naming ``image``'s file, the largest difference and ``reference``'s file.
    """
    difference = float(np.max(np.abs(image.affine - reference.affine)))
    if not difference <= atol_mm:  # "not <=" so that a NaN affine fails too
        raise DataError(
            _image_name(image),
            f"affine differs from that of {_image_name(reference)} by up to "
            f"{difference:.4g} mm (tolerance {atol_mm:g} mm)",
        )


def _shape(image: SpatialImage) -> tuple[int, ...]:
    return tuple(int(n) for n in image.shape)


_ImageCheck = Callable[[SpatialImage], None]

IMAGE_CHECKS: dict[str, tuple[tuple[str, _ImageCheck], ...]] = {
    "t1w": (("not 3D", check_image_3d), ("not finite", check_finite)),
    "t2w": (("not 3D", check_image_3d), ("not finite", check_finite)),
    "dseg": (("not 3D", check_image_3d), ("bad labels", check_labels)),
    "brain_mask": (("not 3D", check_image_3d), ("not binary", check_binary)),
}
"""Per-image checks run by :func:`check_session`: (reason category, check) pairs."""


def check_session(paths: Mapping[str, StrPath | None]) -> list[str]:
    """Open every image of one session and list everything wrong with them.

    Each image is loaded with :func:`load_nifti` and put through :data:`IMAGE_CHECKS`;
    then every readable 3D image is compared against the T2w (or, without one, the first
    readable image) with :func:`check_same_shape` and :func:`check_same_affine`.

    Args:
        paths: ``{"t1w": ..., "t2w": ..., "dseg": ..., "brain_mask": ...}``; a missing,
            ``None`` or empty entry is skipped (a manifest reports missing files itself).

    Returns:
        Reasons in the manifest's wording, ``"<image> <problem>: <path>: <detail>"``, for
        example ``"T2w unreadable: /data/sub-1_ses-1_T2w.nii.gz: truncated: ..."``,
        ``"T1w shape mismatch: ..."`` or ``"brain mask not binary: ..."``; empty when all
        is well. Never raises for a bad file.
    """
    reasons: list[str] = []
    images: dict[str, SpatialImage] = {}
    for key in IMAGE_COLUMNS:
        path = paths.get(key)
        if not path:
            continue
        name = DISPLAY_NAMES[key]
        try:
            image = load_nifti(path)
        except DataError as err:
            reasons.append(f"{name} unreadable: {err}")
            continue
        problems = _run_checks(name, image, IMAGE_CHECKS[key])
        reasons += problems
        if len(image.shape) == 3:  # a 4D image is already reported; don't also compare it
            images[key] = image
    reasons += _cross_check(images)
    return reasons


def _run_checks(
    name: str, image: SpatialImage, checks: Iterable[tuple[str, _ImageCheck]]
) -> list[str]:
    problems = []
    for category, check in checks:
        try:
            check(image)
        except DataError as err:
            problems.append(f"{name} {category}: {err}")
    return problems


def _cross_check(images: Mapping[str, SpatialImage]) -> list[str]:
    if not images:
        return []
    reference_key = REFERENCE_IMAGE if REFERENCE_IMAGE in images else next(iter(images))
    reference = images[reference_key]
    checks = (("shape mismatch", check_same_shape), ("affine mismatch", check_same_affine))
    problems = []
    for key, image in images.items():
        if key == reference_key:
            continue
        for category, check in checks:
            try:
                check(image, reference)
            except DataError as err:
                problems.append(f"{DISPLAY_NAMES[key]} {category}: {err}")
    return problems


# --------------------------------------------------------------------------------------
# Reading the release's tables
# --------------------------------------------------------------------------------------


@dataclass
class _SessionsTable:
    """What one ``sub-<id>_sessions.tsv`` says: raw scan ages by bare session id."""

    path: Path
    scan_ages: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    """Why the table gives no scan ages at all (absent, unreadable, no column), if so."""


@dataclass
class _ReleaseTables:
    """The release-level tables, reduced to raw text values keyed by bare ids."""

    participants_path: Path
    participants: dict[str, dict[str, str]]
    combined_path: Path | None = None
    combined_participants: dict[str, dict[str, str]] = field(default_factory=dict)
    combined_scan_ages: dict[tuple[str, str], str] = field(default_factory=dict)


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV as text cells, every row checked against the header's number of fields.

    Cells stay text (no type guessing, so ``"0123"`` and ``"NA"`` survive); blank lines and
    empty cells past the header's last column (a spreadsheet's trailing tabs) are skipped;
    quoting follows the csv module's (and pandas') defaults. A row with more or fewer
    fields than the header is an error, never silently shifted into other columns (pandas
    would make a first column the index when every data row has one field more).

    Returns:
        The table, with a :class:`~pandas.RangeIndex`; ``table.attrs["lines"]`` holds the
        line number (from 1, the header's being the first) of every row.

    Raises:
        DataError: naming ``path``: not found, unreadable, not UTF-8 text, no header line,
            a column named twice, or "line N: expected K fields, found M".
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            header, rows, lines = _read_tsv_rows(csv.reader(file, delimiter="\t"), path)
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"is not a readable tab-separated table: {err}") from err
    except OSError as err:
        raise DataError(path, f"cannot be read: {err}") from err
    table = pd.DataFrame(rows, columns=header, dtype=str)
    table.attrs["lines"] = lines
    return table


def _read_tsv_rows(reader: Any, path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows and their line numbers; raise on a row of the wrong length."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue  # a blank line
        if header is None:
            header = [field.strip() for field in fields]
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(path, f"line {reader.line_num}: column(s) {repeated} named twice")
            continue
        if len(fields) > len(header) and not any(f.strip() for f in fields[len(header) :]):
            fields = fields[: len(header)]  # trailing empty cells, as spreadsheets write them
        if len(fields) != len(header):
            raise DataError(
                path,
                f"line {reader.line_num}: expected {len(header)} fields, found {len(fields)}",
                hint="fields are separated by single tabs",
            )
        rows.append(fields)
        lines.append(reader.line_num)
    if header is None:
        raise DataError(path, "is empty: expected a header line of tab-separated column names")
    return header, rows, lines


def require_columns(table: pd.DataFrame, required: Iterable[str], path: StrPath) -> None:
    """Raise a :class:`DataError` naming ``path`` if ``table`` lacks any ``required`` column."""
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DataError(
            path, f"lacks the column(s) {missing} (found {list(map(str, table.columns))})"
        )


def _is_missing(text: object) -> bool:
    return text is None or str(text).strip().lower() in MISSING_TEXT


def _participant_values(table: pd.DataFrame) -> dict[str, dict[str, str]]:
    """``{participant_id: {"birth_age": text, "sex": text}}``; first row wins, gaps stay ''."""
    sex_column = next((c for c in ("sex", "gender") if c in table.columns), None)
    birth_column = "birth_age" if "birth_age" in table.columns else None
    values: dict[str, dict[str, str]] = {}
    for _, row in table.iterrows():
        pid = normalise_participant_id(row["participant_id"])
        entry = values.setdefault(pid, {"birth_age": "", "sex": ""})
        for key, column in (("birth_age", birth_column), ("sex", sex_column)):
            if column is not None and _is_missing(entry[key]) and not _is_missing(row[column]):
                entry[key] = str(row[column]).strip()
    return values


def _read_release_tables(layout: _Layout) -> _ReleaseTables:
    root = layout.tables_root
    participants_path = root / PARTICIPANTS_TSV
    participants = read_tsv(participants_path)
    require_columns(participants, ["participant_id"], participants_path)
    tables = _ReleaseTables(participants_path, _participant_values(participants))
    combined_path = root / COMBINED_TSV
    if combined_path.is_file():
        combined = read_tsv(combined_path)
        require_columns(combined, ["participant_id", "session_id"], combined_path)
        tables.combined_path = combined_path
        tables.combined_participants = _participant_values(combined)
        if "scan_age" in combined.columns:
            for _, row in combined.iterrows():
                key = (
                    normalise_participant_id(row["participant_id"]),
                    normalise_session_id(row["session_id"]),
                )
                if not _is_missing(row["scan_age"]):
                    tables.combined_scan_ages.setdefault(key, str(row["scan_age"]).strip())
    return tables


def _read_sessions_table(layout: _Layout, participant_id: str) -> _SessionsTable:
    """Read ``sub-<id>_sessions.tsv``; a broken table is a per-subject problem, not fatal.

    The first of :meth:`_Layout.sessions_tsv_candidates` that exists is read.
    """
    candidates = layout.sessions_tsv_candidates(participant_id)
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        result = _SessionsTable(candidates[0])
        result.problem = (
            f"{candidates[0]} not found"
            if len(candidates) == 1
            else f"neither {' nor '.join(map(str, candidates))} found"
        )
        return result
    result = _SessionsTable(path)
    try:
        table = read_tsv(path)
        require_columns(table, ["session_id"], path)
    except DataError as err:
        result.problem = f"cannot use {err}"
        return result
    has_age = "scan_age" in table.columns
    if not has_age:
        result.problem = f"no scan_age column in {path}"
    for _, row in table.iterrows():
        sid = normalise_session_id(row["session_id"])
        if sid:
            age = str(row["scan_age"]).strip() if has_age else ""
            if _is_missing(result.scan_ages.get(sid)):
                result.scan_ages[sid] = age
    return result


# --------------------------------------------------------------------------------------
# Building the manifest
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where a release keeps its images and its tables.

    Attributes:
        root: the folder the user gave.
        anat_root: the folder holding ``sub-*/ses-*/anat``.
        tables_root: the folder holding ``participants.tsv`` (and ``combined.tsv``).
        subject_roots: folders whose ``sub-<id>/`` may hold ``sub-<id>_sessions.tsv``,
            in the order they are asked.
    """

    root: Path
    anat_root: Path
    tables_root: Path
    subject_roots: tuple[Path, ...]

    def sessions_tsv_candidates(self, participant_id: str) -> list[Path]:
        name = f"sub-{participant_id}"
        return [folder / name / f"{name}_sessions.tsv" for folder in self.subject_roots]


def _release_layout(root: StrPath) -> _Layout:
    """Find the images and tables of a release folder or of its derivatives folder.

    ``root/derivatives/dhcp_anat_pipeline`` holds the images when it exists (tables in
    ``root``, else next to the images); otherwise ``root`` does, with its tables in
    ``root`` or two levels up (``root`` being ``RELEASE/derivatives/dhcp_anat_pipeline``).
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise DataError(root, "folder not found", hint=RELEASE_HINT)
    if not root.is_dir():
        raise DataError(root, "is a file, not a folder", hint=RELEASE_HINT)
    derivatives = root / DERIVATIVES_DIR
    if derivatives.is_dir():
        anat_root, table_candidates = derivatives, [root, derivatives]
    else:
        anat_root, table_candidates = root, [root, root.parent.parent]
    tables_root = next(
        (folder for folder in table_candidates if (folder / PARTICIPANTS_TSV).is_file()), None
    )
    if tables_root is None:
        raise DataError(root / PARTICIPANTS_TSV, "file not found", hint=RELEASE_HINT)
    if not _subject_dirs(anat_root):
        raise DataError(anat_root, "holds no sub-* folders", hint=RELEASE_HINT)
    subject_roots = tuple(dict.fromkeys([anat_root, root, tables_root]))
    return _Layout(root, anat_root, tables_root, subject_roots)


def _subject_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("sub-*") if p.is_dir() and normalise_participant_id(p.name))


def _parse_weeks(text: str) -> float | None:
    """Weeks as float, or None when ``text`` is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _scan_age(
    table: _SessionsTable, session_id: str, tables: _ReleaseTables, participant_id: str
) -> tuple[float, str | None]:
    """Scan age (weeks PMA) from the sessions table, else from combined.tsv, and a reason."""
    raw = table.scan_ages.get(session_id)
    source = table.path
    if _is_missing(raw):
        fallback = tables.combined_scan_ages.get((participant_id, session_id))
        if fallback is not None:
            raw, source = fallback, tables.combined_path
    if _is_missing(raw):
        return math.nan, f"missing scan age: {_why_no_scan_age(table, session_id, raw, tables)}"
    value = _parse_weeks(str(raw))
    if value is None:
        return math.nan, f"invalid scan age: {raw!r} in {source} is not a number of weeks"
    return value, None


def _why_no_scan_age(
    table: _SessionsTable, session_id: str, raw: str | None, tables: _ReleaseTables
) -> str:
    if table.problem is not None:
        why = table.problem
    elif raw is None:
        why = f"no row for session {session_id} in {table.path}"
    elif raw.strip():
        why = f"scan_age is {raw!r} in {table.path}"
    else:
        why = f"scan_age is empty in {table.path}"
    if tables.combined_path is not None:
        why += f" (nor in {tables.combined_path})"
    return why


def _participant_info(
    participant_id: str, tables: _ReleaseTables
) -> tuple[float, str | None, str | None]:
    """Birth age (weeks), sex and an exclusion reason for a participant.

    participants.tsv is asked first and combined.tsv fills its gaps. An unknown birth age
    or sex is not a reason (training needs neither); a birth age that is not a number is.
    """
    entry = dict(tables.participants.get(participant_id, {}))
    source: Path | None = tables.participants_path
    backup = tables.combined_participants.get(participant_id, {})
    for key in ("birth_age", "sex"):
        if _is_missing(entry.get(key)) and not _is_missing(backup.get(key)):
            entry[key] = backup[key]
            if key == "birth_age":
                source = tables.combined_path
    sex = None if _is_missing(entry.get("sex")) else entry["sex"]
    raw_age = entry.get("birth_age")
    if _is_missing(raw_age):
        return math.nan, sex, None
    birth_age = _parse_weeks(str(raw_age))
    if birth_age is None:
        reason = f"invalid birth age: {raw_age!r} in {source} is not a number of weeks"
        return math.nan, sex, reason
    return birth_age, sex, None


def _session_ids(subject_dir: Path, table: _SessionsTable) -> list[str]:
    on_disk = {normalise_session_id(p.name) for p in subject_dir.glob("ses-*") if p.is_dir()} - {""}
    return sorted(on_disk | set(table.scan_ages), key=_natural_key)


def _session_row(
    layout: _Layout,
    participant_id: str,
    session_id: str,
    table: _SessionsTable,
    tables: _ReleaseTables,
    *,
    images: str,
    required: tuple[str, ...],
) -> dict[str, Any]:
    reasons: list[str] = []
    session_dir = layout.anat_root / f"sub-{participant_id}" / f"ses-{session_id}"
    paths = dict.fromkeys(IMAGE_COLUMNS, "")
    if session_dir.is_dir():
        anat_dir = session_dir / "anat"
        found = find_session_images(anat_dir, participant_id, session_id, images=images)
        for key in IMAGE_COLUMNS:
            if found[key] is not None:
                paths[key] = str(found[key])
            elif key in required:
                reasons.append(_missing_image(anat_dir, participant_id, session_id, key, images))
    else:
        reasons.append(f"missing session folder: {session_dir} (listed in {table.path})")
    scan_age, age_reason = _scan_age(table, session_id, tables, participant_id)
    birth_age, sex, birth_reason = _participant_info(participant_id, tables)
    reasons += [reason for reason in (age_reason, birth_reason) if reason]
    return {
        "participant_id": participant_id,
        "session_id": session_id,
        "scan_age": scan_age,
        "birth_age": birth_age,
        "sex": sex,
        "preterm": None if math.isnan(birth_age) else birth_age < PRETERM_BIRTH_AGE_WEEKS,
        **paths,
        "reasons": reasons,
    }


def _missing_image(
    anat_dir: Path, participant_id: str, session_id: str, key: str, images: str
) -> str:
    """``"missing T1w: <anat>/sub-A_ses-1_desc-restore_T1w.nii.gz not found"``, plus a hint
    when the other kind of the image is there."""
    expected = anat_dir / session_filename(participant_id, session_id, key, images=images)
    reason = f"missing {DISPLAY_NAMES[key]}: {expected} not found"
    other = next((kind for kind in IMAGE_KINDS if kind != images), None)
    if key in INTENSITY_SUFFIXES[images] and other is not None:
        elsewhere = find_session_images(anat_dir, participant_id, session_id, images=other)
        if elsewhere[key] is not None:
            reason += f" (there is {elsewhere[key].name}, read with images={other!r})"
    return reason


def _check_images(
    rows: list[dict[str, Any]], keys: tuple[str, ...], *, workers: int, progress: bool
) -> list[list[str]]:
    """:func:`check_session` on the images ``keys`` of every row that has one of them."""
    todo = [i for i, row in enumerate(rows) if any(row[key] for key in keys)]
    jobs = [{key: rows[i][key] for key in keys} for i in todo]
    bar = {"total": len(jobs), "desc": "checking images", "unit": "session"}
    if workers == 1:
        results = [check_session(job) for job in tqdm(jobs, disable=not progress, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(check_session, jobs), disable=not progress, **bar))
    problems: list[list[str]] = [[] for _ in rows]
    for i, found in zip(todo, results, strict=True):
        problems[i] = found
    return problems


def read_manifest(
    root: StrPath,
    *,
    images: str = "restore",
    brain_mask: str = "ignore",
    check: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """List every session of a dHCP release folder and whether it is a complete unit.

    A session is listed when its ``sub-<id>/ses-<ses>`` folder exists or when its
    subject's ``sub-<id>_sessions.tsv`` names it. Participants in ``participants.tsv`` or
    sessions in ``combined.tsv`` without a folder are not listed, so a partial download
    gives a manifest of what was downloaded. A session is complete when it has a T1w and a
    T2w of the chosen kind, a drawem9 dseg (and a brain mask with ``brain_mask="apply"``)
    and a scan age, its birth age (if given) is a number, and, with ``check=True``, every
    image it uses passes :func:`check_session`.

    Metadata come from ``sub-<id>_sessions.tsv`` (scan age) and ``participants.tsv``
    (birth age, ``sex`` or dHCP's ``gender``); ``combined.tsv``, when present, fills what
    those leave empty. A participant missing from both keeps NaN/NA birth age, sex and
    preterm, and stays complete: the paper's "minimal meta data" is the scan age, the
    target of the age head; :func:`summarize_manifest` counts these sessions.

    Args:
        root: the release folder (holding ``participants.tsv`` and
            ``derivatives/dhcp_anat_pipeline/sub-*/``), or a folder holding ``sub-*/``
            itself with ``participants.tsv`` next to it or two levels up; see the module
            notes.
        images: ``"restore"`` for the bias-corrected ``desc-restore`` T1w and T2w,
            ``"plain"`` for ``_T1w``/``_T2w`` (what the paper's authors extracted). A
            session lacking either image of this kind is incomplete.
        brain_mask: ``"ignore"``: the ``brain_mask`` column names the mask when there is
            one, and a session without one stays complete; ``"apply"``: the mask is a
            required image (and checked with ``check=True``), to be applied to the images
            (:func:`to_data_dicts`).
        check: also open and check every image (slow: about a second per image of the
            real release). Problems become reasons and never raise.
        progress: show a tqdm progress bar while checking.
        workers: number of processes checking images in parallel (``check=True`` only).

    Returns:
        One row per session, sorted by participant and session (numbers in numeric order),
        with the columns :data:`MANIFEST_COLUMNS`: ``participant_id``, ``session_id``
        (bare ids, ``string``), ``scan_age`` (weeks PMA) and ``birth_age`` (weeks GA,
        ``float64``, NaN when unknown), ``sex`` (``string``, NA when unknown), ``preterm``
        (``boolean``: birth age < 37 weeks, NA when unknown), ``t1w``, ``t2w``, ``dseg``,
        ``brain_mask`` (absolute paths, ``""`` when missing), ``complete`` (``bool``) and
        ``reason`` (``""`` or every problem joined by ``"; "``, e.g. ``"missing T1w:
        .../sub-A_ses-1_desc-restore_T1w.nii.gz not found"``).

    Raises:
        DataError: when ``root`` is not a folder, no ``participants.tsv`` or no ``sub-*``
            folder is found, or when ``participants.tsv`` / ``combined.tsv`` cannot be
            read or lack their id columns.
        ConfigError: when ``images``, ``brain_mask`` or ``workers`` is not one of the
            accepted values.

    Example:
        >>> manifest = read_manifest("data/dhcp_rel3", images="plain")  # doctest: +SKIP
        >>> manifest.loc[~manifest.complete, "reason"].head()  # doctest: +SKIP
    """
    images = check_image_kind(images)
    required = REQUIRED_IMAGES
    if check_brain_mask_policy(brain_mask) == "apply":
        required += ("brain_mask",)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, but found {workers!r}")
    layout = _release_layout(root)
    tables = _read_release_tables(layout)
    rows = []
    for subject_dir in _subject_dirs(layout.anat_root):
        participant_id = normalise_participant_id(subject_dir.name)
        table = _read_sessions_table(layout, participant_id)
        for session_id in _session_ids(subject_dir, table):
            rows.append(
                _session_row(
                    layout,
                    participant_id,
                    session_id,
                    table,
                    tables,
                    images=images,
                    required=required,
                )
            )
    rows.sort(key=lambda r: (_natural_key(r["participant_id"]), _natural_key(r["session_id"])))
    if check:
        problems = _check_images(rows, required, workers=workers, progress=progress)
        for row, found in zip(rows, problems, strict=True):
            row["reasons"] += found
    for row in rows:
        reasons = row.pop("reasons")
        row["complete"] = not reasons
        row["reason"] = REASON_SEPARATOR.join(_one_line(reason) for reason in reasons)
    return _with_manifest_dtypes(pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)))


def _one_line(reason: str) -> str:
    """Keep a problem on one line and free of the separator, so the reason cell splits back.

    Library messages may hold either (nibabel's "...\\n - could the file be damaged?").
    """
    return re.sub(r"\s*[\t\r\n]\s*", " ", reason).replace(REASON_SEPARATOR, ", ")


def _with_manifest_dtypes(table: pd.DataFrame) -> pd.DataFrame:
    """Give the manifest columns the same dtypes whatever pandas version built them."""
    table = table.copy()
    for column in ("participant_id", "session_id", *IMAGE_COLUMNS, "reason"):
        table[column] = table[column].fillna("").astype("string")
    table["sex"] = table["sex"].astype("string")
    for column in ("scan_age", "birth_age"):
        table[column] = table[column].astype("float64")
    table["preterm"] = table["preterm"].astype("boolean")
    table["complete"] = table["complete"].astype(bool)
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Using a manifest
# --------------------------------------------------------------------------------------


def reason_categories(reason: str) -> list[str]:
    """The categories of a ``reason`` cell: each problem's text before its first ``": "``.

    Example:
        >>> reason_categories("missing T1w; T2w unreadable: /a.nii.gz: truncated: ...")
        ['missing T1w', 'T2w unreadable']
    """
    return [part.split(": ", 1)[0] for part in reason.split(REASON_SEPARATOR) if part]


@dataclass(frozen=True)
class ManifestSummary:
    """Counts that describe a manifest; ``str()`` gives a short report.

    Attributes:
        n_sessions: rows of the manifest.
        n_participants: distinct participants.
        n_complete: complete sessions (the paper keeps 709 of 783).
        n_complete_participants: distinct participants with a complete session.
        n_preterm: complete sessions of infants born before 37 weeks.
        n_birth_age_unknown: complete sessions whose birth age is unknown.
        scan_age_weeks: (min, median, mean, max) scan age of the complete sessions, weeks
            PMA; NaN when there are none.
        excluded: sessions per reason category; a session excluded for two reasons
            counts under both.
        n_brain_mask: complete sessions that have a brain mask.
    """

    n_sessions: int
    n_participants: int
    n_complete: int
    n_complete_participants: int
    n_preterm: int
    n_birth_age_unknown: int
    scan_age_weeks: tuple[float, float, float, float]
    excluded: dict[str, int]
    n_brain_mask: int = 0

    def __str__(self) -> str:
        lines = [
            f"found {self.n_sessions} sessions of {self.n_participants} participants",
            f"complete: {self.n_complete} sessions of {self.n_complete_participants} "
            f"participants ({self.n_preterm} preterm, born < {PRETERM_BIRTH_AGE_WEEKS:g} weeks;"
            f" {self.n_birth_age_unknown} with unknown birth age)",
        ]
        if self.n_complete:
            low, median, mean, high = self.scan_age_weeks
            lines.append(
                f"scan age of complete sessions: median {median:.2f}, mean {mean:.2f}, "
                f"range {low:.2f}-{high:.2f} weeks PMA"
            )
            lines.append(
                f"brain mask: {self.n_brain_mask} of {self.n_complete} complete sessions have one"
            )
        lines.append(f"excluded: {self.n_sessions - self.n_complete} sessions")
        lines += [f"  {category}: {count}" for category, count in self.excluded.items()]
        return "\n".join(lines)


def summarize_manifest(manifest: pd.DataFrame) -> ManifestSummary:
    """Count sessions, complete units and exclusions by reason category.

    Args:
        manifest: a table from :func:`read_manifest` or :func:`load_manifest`.

    Returns:
        A :class:`ManifestSummary`; print it for a report such as ``found 783 sessions of
        ... participants`` / ``complete: 709 ...`` / ``missing T1w: 40``.

    Raises:
        DataError: when ``manifest`` lacks manifest columns.
    """
    manifest = _with_optional_columns(manifest)
    complete = manifest[manifest["complete"].astype(bool)]
    ages = complete["scan_age"].astype("float64")
    categories = Counter(
        category
        for reason in manifest.loc[~manifest["complete"].astype(bool), "reason"]
        for category in reason_categories(str(reason))
    )
    excluded = dict(sorted(categories.items(), key=lambda item: (-item[1], item[0])))
    return ManifestSummary(
        n_sessions=len(manifest),
        n_participants=int(manifest["participant_id"].nunique()),
        n_complete=len(complete),
        n_complete_participants=int(complete["participant_id"].nunique()),
        n_preterm=int(complete["preterm"].astype("boolean").fillna(False).sum()),
        n_birth_age_unknown=int(complete["birth_age"].isna().sum()),
        scan_age_weeks=(
            (float(ages.min()), float(ages.median()), float(ages.mean()), float(ages.max()))
            if len(ages)
            else (math.nan,) * 4
        ),
        excluded=excluded,
        n_brain_mask=int((complete["brain_mask"].fillna("").astype(str) != "").sum()),
    )


def _with_optional_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """Check the manifest columns, adding :data:`OPTIONAL_MANIFEST_COLUMNS` as ``""``."""
    required = [c for c in MANIFEST_COLUMNS if c not in OPTIONAL_MANIFEST_COLUMNS]
    require_columns(manifest, required, "<manifest table>")
    missing = [c for c in OPTIONAL_MANIFEST_COLUMNS if c not in manifest.columns]
    return manifest.assign(**dict.fromkeys(missing, "")) if missing else manifest


def session_record(
    row: Mapping[str, Any] | pd.Series, *, brain_mask: str = "ignore"
) -> dict[str, Any]:
    """Turn one complete manifest row into a MONAI-style data dictionary.

    Args:
        row: a manifest row (a ``Series`` from ``iterrows()`` or a ``dict``).
        brain_mask: ``"apply"`` adds the row's brain mask under ``"brain_mask"``, so the
            transforms zero the images outside it; ``"ignore"`` leaves it out.

    Returns:
        ``{"t1w": path, "t2w": path, "label": dseg path, "scan_age": weeks PMA (float),
        "participant_id": str, "session_id": str}`` (plus ``"brain_mask": path``), the
        keys neonb's transforms use.

    Raises:
        DataError: when the row is not a complete session, or has no brain mask to apply.
        ConfigError: when ``brain_mask`` is not one of :data:`BRAIN_MASK_POLICIES`.
    """
    apply_mask = check_brain_mask_policy(brain_mask) == "apply"
    session = f"sub-{row['participant_id']}/ses-{row['session_id']}"
    if not bool(row["complete"]):
        raise DataError(
            session,
            f"is not a complete session ({row['reason']})",
            hint="keep only rows with complete == True, or use to_data_dicts",
        )
    record = {
        "t1w": str(row["t1w"]),
        "t2w": str(row["t2w"]),
        "label": str(row["dseg"]),
        "scan_age": float(row["scan_age"]),
        "participant_id": str(row["participant_id"]),
        "session_id": str(row["session_id"]),
    }
    if apply_mask:
        mask = row.get("brain_mask")
        if _is_missing(mask) or pd.isna(mask):
            raise DataError(
                session,
                "has no brain mask to apply",
                hint="read the manifest with brain_mask='apply', which makes such "
                "sessions incomplete",
            )
        record["brain_mask"] = str(mask)
    return record


def to_data_dicts(manifest: pd.DataFrame, *, brain_mask: str = "ignore") -> list[dict[str, Any]]:
    """:func:`session_record` of every complete row, in manifest order.

    Args:
        manifest: a table from :func:`read_manifest` or :func:`load_manifest`.
        brain_mask: ``"apply"`` gives every record its ``"brain_mask"`` path, so that
            :func:`neonb.transforms.preprocessing_transforms` zeroes the images outside
            the brain; ``"ignore"`` (the default) leaves masks out.

    Raises:
        DataError: when ``manifest`` lacks manifest columns, or with ``"apply"`` when a
            complete row has no brain mask.
        ConfigError: when ``brain_mask`` is not one of :data:`BRAIN_MASK_POLICIES`.
    """
    check_brain_mask_policy(brain_mask)
    manifest = _with_optional_columns(manifest)
    complete = manifest[manifest["complete"].astype(bool)]
    return [session_record(row, brain_mask=brain_mask) for _, row in complete.iterrows()]


def write_manifest(manifest: pd.DataFrame, path: StrPath) -> Path:
    """Write a manifest as TSV, missing values as ``n/a``, atomically.

    The table goes to a hidden temporary file next to ``path`` that is then renamed, so a
    reader never sees half a manifest. Columns beyond :data:`MANIFEST_COLUMNS` are kept.

    Args:
        manifest: a table from :func:`read_manifest`.
        path: destination, conventionally ``manifest.tsv``; parent folders are created.

    Returns:
        The path written.

    Raises:
        DataError: when ``manifest`` lacks manifest columns.
    """
    path = Path(path)
    require_columns(manifest, MANIFEST_COLUMNS, "<manifest table>")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(
        path, lambda tmp: manifest.to_csv(tmp, sep="\t", index=False, na_rep=TSV_MISSING)
    )


def load_manifest(path: StrPath) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`, with the dtypes of
    :func:`read_manifest`.

    Args:
        path: a manifest TSV.

    Returns:
        The manifest; extra columns are kept as text after the standard ones. A manifest
        written before the ``brain_mask`` column existed gets it, empty.

    Raises:
        DataError: naming ``path`` when it is missing or unreadable, lacks a manifest
            column, or holds a value of the wrong type (naming column and row).
    """
    path = Path(path)
    table = read_tsv(path)
    require_columns(
        table, [c for c in MANIFEST_COLUMNS if c not in OPTIONAL_MANIFEST_COLUMNS], path
    )
    table = _with_optional_columns(table)
    parsed = table.copy()
    for column in ("scan_age", "birth_age"):
        parsed[column] = _parse_float_column(table[column], column, path)
    for column in ("preterm", "complete"):
        parsed[column] = _parse_bool_column(
            table[column], column, path, allow_missing=column == "preterm"
        )
    parsed["sex"] = table["sex"].where(~table["sex"].map(_is_missing), None)
    extra = [column for column in table.columns if column not in MANIFEST_COLUMNS]
    manifest = _with_manifest_dtypes(parsed[list(MANIFEST_COLUMNS)])
    return pd.concat([manifest, table[extra].astype("string")], axis=1)


def _parse_float_column(values: pd.Series, column: str, path: Path) -> pd.Series:
    parsed = pd.to_numeric(values.where(~values.map(_is_missing), None), errors="coerce")
    bad = parsed.isna() & ~values.map(_is_missing)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path, f"column {column} holds {values.iloc[first]!r} (row {first + 2}), not a number"
        )
    return parsed.astype("float64")


def _parse_bool_column(
    values: pd.Series, column: str, path: Path, *, allow_missing: bool
) -> pd.Series:
    mapping = {"true": True, "false": False}
    parsed = values.map(lambda text: mapping.get(str(text).strip().lower()))
    bad = parsed.isna()
    if allow_missing:
        bad &= ~values.map(_is_missing)
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path,
            f"column {column} holds {values.iloc[first]!r} (row {first + 2}), "
            "expected True or False",
        )
    return parsed.astype("boolean")
