"""A folder shaped like the dHCP third release, with tiny images, for tests.

:func:`make_release` writes what :func:`neonb.data.read_manifest` reads from the real
release, with its counts: 887 neonatal sessions of 783 participants, 102 of them scanned
more than once (preterm-born infants scanned soon after birth and again at term-equivalent
age; two of them a third time), scan ages over 26.71-45.14 weeks PMA, skewed towards term
(median about 40.6 weeks). Sessions are made incomplete as in the release, mostly by a
missing T1w, else a missing drawem9 segmentation or scan age, so that 709 complete sessions
remain, the paper's "complete data units".

Every image is a few voxels (``shape``) with the release's file names; all files of one
kind are hard links to one file, written once in ``ROOT/.images`` (a folder the reader never
looks into), so the whole release takes a second or two to write. To damage one image in a
test, unlink it before writing it anew, or every session's copy changes. The images are
valid for ``read_manifest(check=True)``: finite intensities, labels 0-9, a binary brain mask,
one grid.

Example:
    >>> root = make_release(tmp_path)  # doctest: +SKIP
    >>> read_manifest(root, images="plain").complete.sum()  # doctest: +SKIP
    709
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

RELEASE_SESSIONS = 887
RELEASE_PARTICIPANTS = 783
RELEASE_RESCANNED = 102
"""Participants scanned more than once in the release."""
RELEASE_COMPLETE = 709
"""Complete sessions: the paper's data units (§3.1)."""
SCAN_AGE_RANGE = (26.71, 45.14)
"""Youngest and oldest scan age of the release, weeks PMA."""

LAYOUTS = ("release", "derivatives")
TEMPLATES = ".images"
"""Folder under ``root`` holding the one file of each kind that every image links to."""
DERIVATIVES = Path("derivatives", "dhcp_anat_pipeline")
FILES = {
    "t2w": "T2w",
    "restore_t2w": "desc-restore_T2w",
    "t1w": "T1w",
    "restore_t1w": "desc-restore_T1w",
    "dseg": "desc-drawem9_dseg",
    "brain_mask": "desc-brain_mask",
}
"""Name endings of a session's images in ``derivatives/dhcp_anat_pipeline``."""
MISSING_FILES = {"missing T1w": ("t1w", "restore_t1w"), "missing dseg": ("dseg",)}
"""Files a session of each defect lacks; "missing scan age" lacks its age instead."""
DEFECT_SHARES = {"missing T1w": 0.7, "missing dseg": 0.2, "missing scan age": 0.1}
"""How the incomplete sessions divide among the defects (the real release lacks T1w most)."""
PRETERM = 37.0


def incomplete_counts(n_incomplete: int) -> dict[str, int]:
    """How many sessions :func:`make_release` gives each defect (reason category).

    Example:
        >>> incomplete_counts(178)
        {'missing T1w': 125, 'missing dseg': 36, 'missing scan age': 17}
    """
    counts = {name: int(round(share * n_incomplete)) for name, share in DEFECT_SHARES.items()}
    counts["missing scan age"] = n_incomplete - counts["missing T1w"] - counts["missing dseg"]
    return counts


def make_release(
    root: str | os.PathLike,
    *,
    n_participants: int = RELEASE_PARTICIPANTS,
    n_sessions: int = RELEASE_SESSIONS,
    n_rescanned: int = RELEASE_RESCANNED,
    n_incomplete: int = RELEASE_SESSIONS - RELEASE_COMPLETE,
    seed: int = 0,
    shape: tuple[int, int, int] = (4, 4, 4),
    layout: str = "release",
) -> Path:
    """Write a release-shaped folder of tiny images and its tables.

    Args:
        root: folder to write (created; should be empty).
        n_participants: participants, each with at least one session.
        n_sessions: sessions in all; the ``n_sessions - n_participants - n_rescanned``
            beyond a second session go to the first rescanned participants as third scans.
        n_rescanned: participants scanned more than once: preterm-born, first scanned before
            37 weeks, then at term-equivalent age (38-44 weeks), a third scan after that.
        n_incomplete: sessions made incomplete, divided by :func:`incomplete_counts`.
        seed: seed of ages, ids and which sessions are incomplete.
        shape: voxels of every image.
        layout: ``"release"``: ``ROOT/participants.tsv``, ``ROOT/sub-<id>/sub-<id>_sessions.tsv``,
            images in ``ROOT/derivatives/dhcp_anat_pipeline/sub-<id>/ses-<ses>/anat/``;
            ``"derivatives"``: the same with the images in ``ROOT/sub-<id>/ses-<ses>/anat/``
            (the layout :mod:`neonb.phantom` writes).

    Returns:
        ``root``, the folder to give :func:`neonb.data.read_manifest`.

    Raises:
        ValueError: for counts that do not fit together or an unknown layout.
    """
    n_third = n_sessions - n_participants - n_rescanned
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if not 0 <= n_third <= n_rescanned <= n_participants:
        raise ValueError(
            f"cannot make {n_sessions} sessions of {n_participants} participants with "
            f"{n_rescanned} of them rescanned"
        )
    if not 0 <= n_incomplete <= n_sessions:
        raise ValueError(f"n_incomplete must be in [0, {n_sessions}], not {n_incomplete}")
    rng = np.random.default_rng(seed)
    table = _sessions(rng, n_participants, n_rescanned, n_third)
    defects = _defects(rng, len(table), n_incomplete)
    root = Path(root)
    images = root / DERIVATIVES if layout == "release" else root
    _write_tables(root, table, defects)
    _write_images(root, images, table, defects, shape)
    return root


def _sessions(
    rng: np.random.Generator, n_participants: int, n_rescanned: int, n_third: int
) -> pd.DataFrame:
    """One row per session: participant_id, session_id, scan_age, birth_age, sex."""
    rescanned = np.zeros(n_participants, bool)
    rescanned[rng.choice(n_participants, n_rescanned, replace=False)] = True
    third = np.zeros(n_participants, bool)
    third[np.flatnonzero(rescanned)[:n_third]] = True
    rows = []
    session_id = 1000
    for i in range(n_participants):
        birth, ages = _participant_ages(rng, bool(rescanned[i]), bool(third[i]))
        participant_id = f"CC{i + 1:05d}XX{int(rng.integers(1, 20)):02d}"
        sex = "female" if rng.random() < 0.45 else "male"
        for age in ages:
            session_id += int(rng.integers(1, 60))
            rows.append(
                {
                    "participant_id": participant_id,
                    "session_id": str(session_id),
                    "scan_age": age,
                    "birth_age": birth,
                    "sex": sex,
                }
            )
    table = pd.DataFrame(rows)
    low, high = SCAN_AGE_RANGE
    table["scan_age"] = table["scan_age"].clip(low, high).round(2)
    # the release's exact extremes: the youngest and oldest session
    table.loc[table["scan_age"].idxmin(), "scan_age"] = low
    table.loc[table["scan_age"].idxmax(), "scan_age"] = high
    table["birth_age"] = np.minimum(table["birth_age"], table["scan_age"]).round(2)
    return table


def _participant_ages(
    rng: np.random.Generator, rescanned: bool, third: bool
) -> tuple[float, list[float]]:
    """Birth age and scan ages (weeks) of one participant, scans in order."""
    if rescanned:  # preterm-born: scanned soon after birth, again at term-equivalent age
        birth = 24.0 + 10.0 * rng.beta(2.0, 1.5)
        first = min(birth + rng.gamma(1.5, 1.2), 36.5)
        ages = [first, float(np.clip(rng.normal(41.0, 1.5), 38.0, 44.0))]
        if third:
            ages.append(min(ages[-1] + 1.0 + rng.gamma(2.0, 0.5), SCAN_AGE_RANGE[1]))
        return birth, ages
    if rng.random() < 0.03:  # preterm-born, scanned once, soon after birth
        birth = 28.0 + 9.0 * rng.beta(2.0, 1.2)
        return birth, [birth + rng.gamma(1.5, 1.2)]
    birth = float(np.clip(rng.normal(39.8, 1.2), PRETERM, 42.5))
    return birth, [birth + rng.gamma(1.5, 0.8)]


def _defects(rng: np.random.Generator, n_sessions: int, n_incomplete: int) -> dict[int, str]:
    """Session index -> reason category, for ``n_incomplete`` sessions drawn at random."""
    chosen = rng.choice(n_sessions, n_incomplete, replace=False)
    names = [name for name, count in incomplete_counts(n_incomplete).items() for _ in range(count)]
    return dict(zip(chosen.tolist(), names, strict=True))


def _write_tables(root: Path, table: pd.DataFrame, defects: dict[int, str]) -> None:
    """participants.tsv (the release's ``gender`` column) and one sessions.tsv each."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["participant_id\tgender\tbirth_age"]
    for row in table.drop_duplicates("participant_id").itertuples(index=False):
        lines.append(f"{row.participant_id}\t{row.sex}\t{row.birth_age:.2f}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    sessions: dict[str, list[str]] = {}
    for index, row in enumerate(table.itertuples(index=False)):
        rows = sessions.setdefault(row.participant_id, [])
        age = "n/a" if defects.get(index) == "missing scan age" else f"{row.scan_age:.2f}"
        rows.append(f"{row.session_id}\t{age}\t{len(rows) + 1}\t1")
    for participant_id, rows in sessions.items():
        folder = root / f"sub-{participant_id}"
        folder.mkdir(exist_ok=True)
        header = "session_id\tscan_age\tscan_number\tradiology_score"
        text = "\n".join([header, *rows]) + "\n"
        (folder / f"sub-{participant_id}_sessions.tsv").write_text(text)


def _write_images(
    root: Path,
    folder: Path,
    table: pd.DataFrame,
    defects: dict[int, str],
    shape: tuple[int, int, int],
) -> None:
    """Each session's images, as hard links to one file per kind in ``root/.images``."""
    sources = root / TEMPLATES
    sources.mkdir(parents=True, exist_ok=True)
    templates = {}
    for key, content in _image_bytes(shape).items():
        templates[key] = sources / f"{FILES[key]}.nii.gz"
        templates[key].write_bytes(content)
    for index, row in enumerate(table.itertuples(index=False)):
        prefix = f"sub-{row.participant_id}_ses-{row.session_id}"
        anat = folder / f"sub-{row.participant_id}" / f"ses-{row.session_id}" / "anat"
        anat.mkdir(parents=True)
        skip = MISSING_FILES.get(defects.get(index, ""), ())
        for key, ending in FILES.items():
            if key not in skip:
                os.link(templates[key], anat / f"{prefix}_{ending}.nii.gz")


def _image_bytes(shape: tuple[int, int, int]) -> dict[str, bytes]:
    """Gzipped NIfTI bytes of each kind of image, on one 0.5 mm grid."""
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    rng = np.random.default_rng(0)
    intensity = (rng.random(shape) * 100.0 + 1.0).astype(np.float32)
    labels = (np.arange(np.prod(shape)) % 10).reshape(shape).astype(np.uint8)
    arrays = {
        "t2w": intensity,
        "restore_t2w": intensity,
        "t1w": intensity,
        "restore_t1w": intensity,
        "dseg": labels,
        "brain_mask": (labels > 0).astype(np.uint8),
    }
    return {
        key: gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), mtime=0)
        for key, array in arrays.items()
    }
