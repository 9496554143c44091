"""The dHCP ``drawem9`` tissue labels as data.

The dHCP structural pipeline (Makropoulos et al., 2018) ships a nine-tissue
segmentation, ``*_desc-drawem9_dseg.nii.gz``, whose voxels hold the integers 0-9 of
:data:`DRAWEM9`. Two of the ten classes are background: 0 lies outside the head
(image intensity 0) and 4 is non-brain tissue inside the skull. Richter & Fetit (2022)
report Dice both over all ten classes and over the eight tissues alone ("no BG").

Example:
    >>> from neonb.labels import DRAWEM9, TISSUE_LABELS
    >>> DRAWEM9[5].short_name
    'Ventr.'
    >>> TISSUE_LABELS
    (1, 2, 3, 5, 6, 7, 8, 9)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neonb.files import atomic_write


@dataclass(frozen=True)
class Label:
    """One class of a segmentation.

    Attributes:
        index: voxel value in the ``dseg`` image.
        name: full name, as in the dHCP documentation.
        short_name: abbreviation used in the paper's tables.
        color: display colour as ``#rrggbb``.
        is_background: whether the class is one of the two background classes.
    """

    index: int
    name: str
    short_name: str
    color: str
    is_background: bool = False


DRAWEM9: dict[int, Label] = {
    label.index: label
    for label in (
        Label(0, "Background (outside the brain)", "BG (outer)", "#000000", True),
        Label(1, "Cerebrospinal fluid", "CSF", "#4fa8e8"),
        Label(2, "Cortical grey matter", "cGM", "#d94a4a"),
        Label(3, "White matter", "WM", "#f2e6c2"),
        Label(4, "Background (inside the skull, non-brain)", "BG (inner)", "#6b6b6b", True),
        Label(5, "Ventricles", "Ventr.", "#1f3fbf"),
        Label(6, "Cerebellum", "Cereb.", "#4cb86b"),
        Label(7, "Deep grey matter", "dGM", "#e39b2d"),
        Label(8, "Brainstem", "BS", "#a05cc8"),
        Label(9, "Hippocampi and amygdala", "Hippoc.", "#e07fc0"),
    )
}
"""The ten drawem9 classes, keyed by voxel value."""

NUM_CLASSES: int = len(DRAWEM9)
"""Number of output channels of a drawem9 segmentation network (10)."""

BACKGROUND_LABELS: tuple[int, ...] = tuple(i for i, lab in DRAWEM9.items() if lab.is_background)
"""Voxel values of the two background classes: ``(0, 4)``."""

TISSUE_LABELS: tuple[int, ...] = tuple(i for i, lab in DRAWEM9.items() if not lab.is_background)
"""Voxel values of the eight brain tissues and fluids."""


def short_names(indices: tuple[int, ...] | None = None) -> list[str]:
    """Paper-style short names (``CSF``, ``cGM``, ...) of ``indices`` (default: all ten)."""
    indices = tuple(DRAWEM9) if indices is None else indices
    return [DRAWEM9[i].short_name for i in indices]


def colors(indices: tuple[int, ...] | None = None) -> list[str]:
    """Display colours (``#rrggbb``) of ``indices`` (default: all ten)."""
    indices = tuple(DRAWEM9) if indices is None else indices
    return [DRAWEM9[i].color for i in indices]


def label_table() -> pd.DataFrame:
    """The label table as a BIDS ``dseg.tsv`` frame.

    Returns:
        One row per class with the columns ``index``, ``name``, ``abbreviation``,
        ``color`` and ``background`` (bool).
    """
    return pd.DataFrame(
        {
            "index": [lab.index for lab in DRAWEM9.values()],
            "name": [lab.name for lab in DRAWEM9.values()],
            "abbreviation": [lab.short_name for lab in DRAWEM9.values()],
            "color": [lab.color for lab in DRAWEM9.values()],
            "background": [lab.is_background for lab in DRAWEM9.values()],
        }
    )


def write_dseg_tsv(path: str | os.PathLike) -> Path:
    """Write the BIDS ``dseg.tsv`` look-up table that describes a drawem9 segmentation.

    The file is written to a temporary name and renamed, so a reader never sees half of it.

    Args:
        path: destination, conventionally ``dseg.tsv`` or ``*_dseg.tsv``.

    Returns:
        The path written.
    """
    return atomic_write(path, lambda tmp: label_table().to_csv(tmp, sep="\t", index=False))
