"""A seeded synthetic neonatal cohort in the dHCP release layout.

The third dHCP release (Makropoulos et al., 2018), on which Richter & Fetit (2022) trained,
needs a data-use agreement. So that every notebook runs without it, this module draws a
*phantom* cohort: T1- and T2-weighted volumes, plain and bias-corrected, with a ``drawem9``
segmentation and a brain mask, written with the file names of the release's
``derivatives/dhcp_anat_pipeline`` folder, with scan ages distributed like the 709 complete dHCP
sessions the paper used (§3.1): 26.7-45.1 weeks post-menstrual age (PMA), negatively
skewed, median about 40.6 and mean about 39.6 weeks, about 21 % born preterm.

Each subject is built from implicit shapes (signed distances in mm) in a 40-week template:

* a cerebrum (an egg-shaped ellipsoid split by an interhemispheric fissure) whose surface is
  indented by sulci that deepen with age, lined by a cortical ribbon (label 2) of constant
  thickness around white matter (label 3);
* two cerebellar hemispheres and a vermis (6) that grow faster than the rest of the brain;
  a brainstem (8) running from the thalami to the bottom of the brain; thalami, lentiform
  and caudate nuclei (7); two C-shaped lateral ventricles (5), relatively larger in the
  youngest; hippocampi and amygdalae (9) along the temporal horns;
* extracerebral CSF (1) around the brain, thicker in the youngest, and a shell of
  meninges, skull and scalp (4) inside the head surface; 0 outside the head.

The template is scaled with age (total brain volume from about 160 mL at 28 weeks to
480 mL at 44 weeks), jittered per subject in size, shape, position and rotation, and warped
by a smooth random displacement field; left and right structures are jittered separately.
Intensities follow neonatal contrast: on T2w, fluid is brightest and unmyelinated white
matter brighter than cortex; on T1w the order is roughly inverted. Myelination, rising with
age, darkens white matter on T2w and brightens it on T1w, so the T1w white/grey order flips
between 28 and 44 weeks. Partial-volume blur, a smooth bias field, Rician noise and a
per-subject scanner scale complete the images. These are the bias-corrected images
(``desc-restore``; the correction leaves a mild residual field, as N4 does); the plain ones are
them times a stronger smooth field of the scanner (:meth:`PhantomSubject.uncorrected`). The
brain mask is made from the labels as the dHCP pipeline makes its own
(:func:`brain_mask_from_labels`).

Anatomy depends only on the seed and the ages, not on the voxel size: all random shape
parameters are drawn before the grid is known, and the noise last. The largest heads of the
oldest infants are narrowed slightly so that, as in dHCP, the head stays inside the field
of view.

.. warning::
    The cortex is about 2.5-3 mm thick, thicker than the 1-2 mm of a real neonatal cortex,
    so that it survives the coarse 1.5 mm demonstration grid. Numbers computed on this
    phantom describe neonb's behaviour on it, not on real infants.

Example:
    >>> from neonb.phantom import grid_shape, make_subject
    >>> grid_shape(0.5)
    (217, 290, 290)
    >>> subject = make_subject(40.0, voxel_size=3.0, seed=1)
    >>> subject.t2w.shape, subject.dseg.dtype.name
    ((36, 48, 48), 'uint8')
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from neonb import __version__
from neonb.errors import ConfigError, DataError
from neonb.files import default_file_mode
from neonb.labels import DRAWEM9

logger = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]
Slices3 = tuple[slice, slice, slice]

# --- labels, by their short names in neonb.labels so the two modules cannot drift apart ----
_INDEX = {label.short_name: label.index for label in DRAWEM9.values()}
OUTSIDE = _INDEX["BG (outer)"]
CSF = _INDEX["CSF"]
CGM = _INDEX["cGM"]
WM = _INDEX["WM"]
NON_BRAIN = _INDEX["BG (inner)"]
VENTRICLES = _INDEX["Ventr."]
CEREBELLUM = _INDEX["Cereb."]
DGM = _INDEX["dGM"]
BRAINSTEM = _INDEX["BS"]
HIPPOCAMPI = _INDEX["Hippoc."]

BRAIN_LABELS: tuple[int, ...] = (CGM, WM, VENTRICLES, CEREBELLUM, DGM, BRAINSTEM, HIPPOCAMPI)
"""Labels whose total volume follows :func:`brain_volume_ml`: tissue and ventricles, without
the extracerebral CSF (1) and the non-brain tissue (4)."""

# --- grid -------------------------------------------------------------------------------
FOV_MM: Vec3 = (108.5, 145.0, 145.0)
"""dHCP field of view in mm along x (left->right), y (posterior->anterior), z (inf.->sup.)."""
DHCP_VOXEL_SIZE = 0.5
"""Isotropic voxel size of the dHCP release in mm (grid 217 x 290 x 290)."""
VOXEL_SIZE_RANGE = (0.25, 10.0)
"""Accepted voxel sizes in mm: finer grids would need several GB, coarser ones lose labels."""
QFORM_CODE = 1
"""NIfTI qform/sform code written: 1 = scanner-based anatomical coordinates."""
GZIP_LEVEL = 1
"""gzip level of the written NIfTI files; nibabel's default, as higher levels buy little on
noisy float images and cost several times the time."""

# --- age distribution (weeks PMA), tuned to the 709 dHCP sessions of the paper's §3.1 ------
SCAN_AGE_RANGE = (26.71, 45.14)
PRETERM_BIRTH_AGE = 37.0
"""Infants born before this age (weeks PMA) are preterm."""
AGE_DECIMALS = 2
P_PRETERM_PARTICIPANT = 0.166
"""Chance that a participant is born preterm; with the second sessions below, about 21 % of
sessions (148 of 709 in dHCP) are of preterm-born infants."""
TERM_BIRTH_MEAN, TERM_BIRTH_SD, TERM_BIRTH_MAX = 39.8, 1.2, 42.5
TERM_GAP_SHAPE, TERM_GAP_SCALE = 1.5, 0.8
"""Gamma-distributed weeks between birth and scan of term-born infants (mean 1.2)."""
PRETERM_BIRTH_SPAN, PRETERM_BIRTH_BETA = 12.0, (1.7, 1.3)
"""Preterm birth age is ``37 - span * Beta(a, b)`` weeks, i.e. between 25 and 37."""
PRETERM_GAP_SHAPE, PRETERM_GAP_SCALE = 1.5, 1.2
P_SECOND_SESSION = 1.0 / 3.0
"""Chance that a preterm-born participant scanned before 37 weeks comes back at term age."""
TERM_EQUIVALENT_MEAN, TERM_EQUIVALENT_SD, TERM_EQUIVALENT_RANGE = 41.0, 1.5, (38.0, 44.0)
MIN_WEEKS_BETWEEN_SESSIONS = 2.0
SUPPORTED_AGE_RANGE = (23.0, 48.0)
"""Ages (weeks PMA) :func:`make_subject` accepts; the growth model is not meant beyond."""

# --- growth and maturation (weeks PMA) ---------------------------------------------------
TERM_AGE = 40.0
TERM_BRAIN_ML = 400.0
BRAIN_ML_PER_WEEK = 20.0
"""Linear growth that triples the brain between 28 (160 mL) and 44 weeks (480 mL)."""
TEMPLATE_BRAIN_ML, TEMPLATE_BRAIN_ML_PER_WEEK = 353.0, 0.9
"""Brain volume (mL) of the unscaled template with the proportions of a given age (measured;
it changes as cerebellum, ventricles and CSF spaces do), which scaling brings to
:func:`brain_volume_ml`."""
MYELIN_MIDPOINT, MYELIN_WIDTH = 40.0, 2.0
"""Logistic myelination curve: half-way at 40 weeks, 0.25 % at 28 and 88 % at 44 weeks."""
CENTRAL_MYELIN_LEAD = 3.0
"""Central white matter (internal capsule, corona radiata) myelinates this many weeks
ahead of the periphery."""
FOLDING_MIDPOINT, FOLDING_WIDTH = 35.0, 2.0
"""Logistic folding curve: 3 % of term depth at 28 weeks, 92 % at 40 weeks."""
CEREBELLUM_FRACTION_TERM, CEREBELLUM_FRACTION_PER_WEEK = 0.065, 0.0025
"""Cerebellar share of the brain: 3.5 % at 28, 6.5 % at 40 and 7.5 % at 44 weeks."""
IMMATURITY_AGES = (28.0, 40.0)
"""Between these ages the ventricles and extracerebral CSF shrink to their term size."""
VENTRICLE_IMMATURE_SCALE = 1.45
"""Radius of the ventricles at 28 weeks relative to term."""
CSF_MM = (4.0, 2.0)
"""Extracerebral CSF thickness in mm at 28 and at 40 weeks and after."""
SHELL_MM = (2.5, 3.0)
"""Thickness in mm of the meninges-skull-scalp shell (label 4) at 28 and 44 weeks."""
CORTEX_MM = (2.5, 3.0)
"""Cortical thickness in mm at 28 and 44 weeks; thicker than real, see the module notes."""
GROWTH_AGES = (28.0, 44.0)
PREMATURITY_BIRTH_AGES = (29.0, 37.0)
"""Prematurity weight: 1 for birth at or before 29 weeks, 0 from 37 weeks."""
PREMATURITY_VENTRICLES, PREMATURITY_CSF, PREMATURITY_FOLDING = 0.25, 0.30, -0.15
"""Relative effect of full prematurity at the same scan age: larger ventricles and
extracerebral CSF, slightly less folding (as reported for preterm infants at term age)."""

# --- template anatomy: mm, at 40 weeks, origin at the centre of the cerebrum ------------------
# x: left->right, y: posterior->anterior, z: inferior->superior; "s" marks bilateral x.
CEREBRUM_SEMI_AXES = (39.0, 56.5, 47.0, 30.0)
"""Left-right, anterior-posterior, superior and inferior semi-axes (mm)."""
CEREBRUM_OCCIPITAL_WIDENING = 0.07
"""Relative left-right widening towards the back, for the egg shape seen from above."""
TEMPORAL_LOBES = ((0.7, 0.25), (0.05, 0.35), 0.3)
"""Where the temporal lobes hang below the rest of the cerebrum: centre and width in
normalised |x| and in y, and the relative increase of the inferior semi-axis there."""
FISSURE_HALF_WIDTH = 1.2
"""Half-width (mm) of the interhemispheric fissure at term; it widens with the CSF."""
CALLOSAL_CORE = ((-2.0, -2.0), (30.0, 22.0))
"""(y, z) centre and semi-axes of the region the fissure stops at: corpus callosum and
diencephalon."""
CEREBELLUM_HEMISPHERE = ((15.0, -38.0, -28.0), (16.0, 13.5, 11.0))
VERMIS = ((0.0, -40.0, -26.0), (7.0, 12.0, 11.0))
CEREBELLUM_GROWTH_CENTRE = (0.0, -38.0, -27.0)
TENTORIUM_GAP = 2.0
"""Gap (mm) kept between cerebrum and cerebellum or lower brainstem; it fills with CSF."""
BRAINSTEM_AXIS = (((0.0, -12.0, -2.0), 7.5), ((0.0, -8.0, -28.0), 9.0), ((0.0, -14.0, -54.0), 5.5))
"""Points of the brainstem axis with their radii (mm): midbrain, pons, lower medulla."""
BRAINSTEM_BALL = ((0.0, -11.0, -28.0), 36.0)
"""Centre and radius (mm) of a ball holding the brainstem."""
SKULL_BASE = ((0.0, -14.0, -42.0), (28.0, 34.0, 18.0))
"""Centre and semi-axes (template mm) of the non-brain tissue under the brain."""
CEREBRUM_BASE_Z = -10.0
"""Below this height the brainstem is carved out of the cerebrum, leaving a cistern."""
DEEP_GREY = (
    ((10.0, -10.0, 2.0), (9.0, 14.0, 9.5)),  # thalamus
    ((21.0, 3.0, 0.0), (6.0, 15.0, 10.0)),  # lentiform nucleus
    ((13.0, 15.0, 9.0), (5.0, 9.0, 8.0)),  # caudate head
)
"""(centre, semi-axes) of the bilateral deep grey nuclei, right side (x > 0)."""
VENTRICLE_AXIS = (
    ((6.0, 26.0, 10.0), 2.5),  # frontal horn tip
    ((7.0, 14.0, 14.0), 3.0),
    ((9.0, -8.0, 16.0), 3.0),  # body
    ((17.0, -24.0, 10.0), 4.0),  # atrium
    ((15.0, -40.0, 8.0), 2.0),  # occipital horn tip
)
TEMPORAL_HORN_AXIS = (
    ((17.0, -24.0, 10.0), 3.0),
    ((24.0, -12.0, -6.0), 2.2),
    ((25.0, 4.0, -12.0), 1.8),
)
HIPPOCAMPUS_AXIS = (
    ((21.0, 2.0, -14.0), 4.5),
    ((21.0, -10.0, -10.0), 4.0),
    ((19.0, -23.0, -2.0), 3.0),
)
SULCAL_WAVES = 14
SULCAL_WAVELENGTH = 26.0
"""Spacing (template mm) of the sulcal pattern; gyri are about half as wide."""
SULCAL_DEPTH = 10.0
"""Depth (template mm) of the sulci at full folding."""
SULCAL_WIDTH = 0.2
"""Half-width of the sulci at the surface in units of the unit-variance sulcal field (about
1 mm); smaller is narrower."""
SULCAL_DEPTH_WAVES, SULCAL_DEPTH_WAVELENGTH, SULCAL_DEPTH_VARIATION = 4, 70.0, 0.5
"""A slow random field makes sulci up to 50 % shallower in places."""
SULCUS_FREE_CORE = ((0.0, -2.0, -4.0), (24.0, 32.0, 24.0), 6.0)
"""Centre, semi-axes and fade-in distance (template mm) of the central region that sulci do
not enter: corpus callosum, basal ganglia, thalami and the cisterns below them."""
SYLVIAN_LATERAL = (0.45, 0.25)
"""The Sylvian fissure fades in from this |x| on the unit sphere, over this distance."""
SYLVIAN_LINE = ((0.35, -0.35), (-0.35, 0.25))
"""(y, z) of the ends of the Sylvian fissure on the unit sphere of the cerebrum."""
SYLVIAN_DEPTH = (7.0, 10.0)
SYLVIAN_WIDTH = (0.16, 0.05)
"""Depth (template mm) and width (unit sphere) of the Sylvian fissure, from an open operculum
(28 weeks) to a closed one (term)."""
CEREBELLAR_FOLIUM_MM = 3.0
CEREBELLAR_CORE = 0.45
"""Fraction of the cerebellar radius taken by its white-matter core."""

# --- per-subject variability ---------------------------------------------------------------
SUBJECT_CENTRE = (0.0, 0.0, 6.0)
"""World position (mm) of the centre of the cerebrum of an average subject."""
SIZE_SD, AXIS_SD, JITTER_CLIP = 0.03, 0.03, 2.0
"""Log-normal size and per-axis shape jitter; draws are clipped at 2 SD."""
ROTATION_SD_DEG, TRANSLATION_SD_MM = 2.0, 1.0
BILATERAL_SHIFT_MM, BILATERAL_SIZE_SD = 1.0, 0.06
"""Independent jitter of left and right structures: position (mm) and log size."""
VENTRICLE_SIZE_SD = 0.15
HEAD_HALF_EXTENT = (41.5, 58.5)
"""Largest left-right and anterior-posterior half-extent (template mm) of the brain seen in
warped subjects, used to keep the head inside the field of view."""
FOV_MARGIN_MM = 1.0
WARP_SPACING_MM, WARP_SD_MM = 24.0, 5.0
"""Control-point spacing and coefficient SD (mm) of the smooth random displacement field:
about 1.5 mm RMS and 3-4 mm at most."""

# --- intensities ---------------------------------------------------------------------------
T2W_CONTRAST = {
    CSF: (1.00, 1.00),
    CGM: (0.42, 0.40),
    WM: (0.78, 0.60),
    VENTRICLES: (0.97, 0.97),
    CEREBELLUM: (0.52, 0.44),
    DGM: (0.40, 0.32),
    BRAINSTEM: (0.46, 0.28),
    HIPPOCAMPI: (0.55, 0.50),
}
"""T2w intensity of each tissue when unmyelinated and when fully myelinated (CSF = 1)."""
T1W_CONTRAST = {
    CSF: (0.12, 0.12),
    CGM: (0.50, 0.50),
    WM: (0.34, 0.66),
    VENTRICLES: (0.12, 0.12),
    CEREBELLUM: (0.45, 0.62),
    DGM: (0.55, 0.68),
    BRAINSTEM: (0.50, 0.78),
    HIPPOCAMPI: (0.46, 0.50),
}
"""T1w intensity of each tissue, unmyelinated and fully myelinated; peripheral WM crosses cGM
at a myelination of 0.5 (40 weeks), central WM a few weeks earlier."""
_CONTRAST = {"t2w": T2W_CONTRAST, "t1w": T1W_CONTRAST}
SKULL = {"t2w": 0.10, "t1w": 0.08}
SCALP = {"t2w": 0.55, "t1w": 0.85}
"""Intensities of the inner (dura, bone) and outer (scalp, fat) layers of label 4."""
SOFT_TISSUE = {"t2w": 0.30, "t1w": 0.45}
"""Intensity of the skull base and neck (muscle), the rest of label 4."""
SKULL_FRACTION = 0.4
"""Inner fraction of the label-4 shell that is dura and bone."""
CONTRAST_SD = 0.03
"""Log-normal jitter of each tissue's intensity per subject."""
FOLIUM_CONTRAST = 0.15
FOLIUM_JITTER_MM = 1.2
PV_SIGMA_VOXELS = 0.6
"""Partial-volume blur (Gaussian SD in voxels)."""
BIAS_SPACING_MM, BIAS_SD = 60.0, 0.75
"""Control-point spacing and log-coefficient SD of the bias field; the smooth field varies
by about +-15 % over the head (SD 7 %). It is the residual field of the bias-corrected
images."""
SCANNER_BIAS_SPACING_MM, SCANNER_BIAS_SD = 80.0, 1.2
"""Control-point spacing and log-coefficient SD of the field that the plain (uncorrected)
images carry on top; scaled to a geometric mean of 1 over the grid, it varies by about
+-15 to +-50 % over the head (log SD 0.07-0.19)."""
SNR_RANGE = (20.0, 30.0)
"""Signal-to-noise ratio of white matter, per image."""
SCANNER_SCALE_RANGE = (500.0, 2000.0)
"""Arbitrary scanner units: each image is multiplied by a factor drawn from this range."""

# --- files -----------------------------------------------------------------------------------
PHANTOM_VERSION = 2
"""Bumped whenever the generator changes the files it writes for a given seed (2: the plain
images and the brain mask, and the release's name of the restored T1w)."""
DATASET_NAME = "neonb synthetic neonatal cohort"
BIDS_VERSION = "1.8.0"
MODALITIES = ("t2w", "t1w")
"""The intensity images, in the order their random parameters are drawn."""
SUFFIXES = {
    "t2w": "T2w.nii.gz",
    "restore_t2w": "desc-restore_T2w.nii.gz",
    "t1w": "T1w.nii.gz",
    "restore_t1w": "desc-restore_T1w.nii.gz",
    "dseg": "desc-drawem9_dseg.nii.gz",
    "brain_mask": "desc-brain_mask.nii.gz",
}
"""File name endings, after ``sub-<id>_ses-<id>_``, as in the dHCP third release's
``derivatives/dhcp_anat_pipeline``: plain and bias-corrected (``desc-restore``) T2w and T1w
(on the T2w grid), drawem9 labels and the brain mask."""
MASK_EXCLUDED_LABELS = (OUTSIDE, CSF, NON_BRAIN)
MASK_DILATIONS, MASK_EROSIONS = 3, 2
"""The dHCP pipeline's brain mask: tissue labels without CSF and non-brain tissue, dilated three
times and eroded twice with a 3 x 3 x 3 box, holes filled (``fslmaths -dilD x3 -ero x2``,
``mirtk fill-holes``)."""
PARTICIPANT_PREFIX = "SYN"
_AGES_STREAM, _SESSION_STREAM, _SCANNER_BIAS_STREAM = 0, 1, 2
_TMP_PREFIX = ".neonb-"


@dataclass(frozen=True, eq=False)
class PhantomSubject:
    """One synthetic session: two images, their segmentation and its ages.

    Attributes:
        t1w: bias-corrected T1-weighted image (``desc-restore``), float32, shape
            ``(X, Y, Z)``, arbitrary scanner units, exactly 0 where ``dseg == 0``.
        t2w: bias-corrected T2-weighted image, float32, shape ``(X, Y, Z)``, same conventions.
        dseg: drawem9 labels 0-9 (:data:`neonb.labels.DRAWEM9`), uint8, shape ``(X, Y, Z)``.
        affine: 4 x 4 voxel-to-world matrix, RAS+, mm, shared by the three arrays.
        scan_age: post-menstrual age at scan, weeks.
        birth_age: gestational age at birth, weeks, or ``None`` if not given.
        voxel_size: isotropic voxel size, mm.
    """

    t1w: np.ndarray
    t2w: np.ndarray
    dseg: np.ndarray
    affine: np.ndarray
    scan_age: float
    birth_age: float | None
    voxel_size: float

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(X, Y, Z)`` in voxels."""
        x, y, z = self.dseg.shape
        return x, y, z

    @functools.cached_property
    def brain_mask(self) -> np.ndarray:
        """The brain mask, uint8 0/1, shape ``(X, Y, Z)`` (:func:`brain_mask_from_labels`)."""
        return brain_mask_from_labels(self.dseg)

    def to_nifti(self) -> dict[str, nib.Nifti1Image]:
        """The bias-corrected images, labels and brain mask as NIfTI-1 images keyed
        ``"t1w"``, ``"t2w"``, ``"dseg"`` and ``"brain_mask"``."""
        keys = ("t1w", "t2w", "dseg", "brain_mask")
        return {key: _nifti(getattr(self, key), self.affine) for key in keys}

    def uncorrected(self, seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
        """The T1w and T2w before bias correction: each times a smooth scanner field.

        Args:
            seed: seed or generator of the fields (one per image, drawn T2w first).

        Returns:
            ``{"t1w": ..., "t2w": ...}``, float32, shape ``(X, Y, Z)``; 0 where the
            bias-corrected image is 0, which they equal divided by their field
            (:func:`scanner_bias_field`).
        """
        rng = _as_generator(seed)
        fields = {key: scanner_bias_field(self.shape, self.voxel_size, rng) for key in MODALITIES}
        return {key: getattr(self, key) * fields[key] for key in ("t1w", "t2w")}


# =============================================================================================
# Ages
# =============================================================================================


def sample_ages(n: int, rng: np.random.Generator | int = 0) -> pd.DataFrame:
    """Draw ``n`` scan sessions with ages distributed like the dHCP release.

    Participants are drawn one after another until there are ``n`` sessions. A term-born
    participant (birth at 37-42.5 weeks) is scanned once, one or two weeks after birth. A
    preterm-born one (birth at 25-37 weeks, chance 0.166) is scanned soon after birth, and a
    third of those scanned before 37 weeks come back at term-equivalent age (38-44 weeks).
    Over all sessions, scan ages lie in 26.71-45.14 weeks with median about 40.6 and mean
    about 39.6 weeks, negatively skewed, and about 21 % of sessions are of preterm-born
    infants, as in the paper's §3.1. Ages are rounded to 0.01 week, like dHCP's.

    Each participant uses the generator in the same way whatever ``n`` is, so the first
    ``k`` rows of a draw are the draw for ``n = k`` (up to a truncated second session).

    Args:
        n: number of sessions, at least 1.
        rng: generator, or seed for :func:`numpy.random.default_rng`.

    Returns:
        One row per session, participants in order, with the columns ``participant_id``
        (bare, e.g. ``"SYN0001"``), ``session_id`` (bare, ``"1"`` or ``"2"``), ``scan_age``
        and ``birth_age`` (weeks PMA, ``birth_age <= scan_age``) and ``sex``
        (``"female"``/``"male"``).

    Raises:
        ConfigError: if ``n`` is not a positive integer.

    Example:
        >>> ages = sample_ages(5000, rng=0)
        >>> print(f"median {ages.scan_age.median():.1f}, mean {ages.scan_age.mean():.1f} weeks")
        median 40.5, mean 39.6 weeks
    """
    _check_count(n)
    rng = _as_generator(rng)
    rows: list[dict[str, object]] = []
    participant = 0
    while len(rows) < n:
        participant += 1
        birth_age, scan_ages, sex = _draw_participant(rng)
        for session, scan_age in enumerate(scan_ages, start=1):
            rows.append(
                {
                    "participant": participant,
                    "session_id": str(session),
                    "scan_age": scan_age,
                    "birth_age": birth_age,
                    "sex": sex,
                }
            )
    table = pd.DataFrame(rows[:n])
    width = max(4, len(str(participant)))
    table.insert(
        0,
        "participant_id",
        [f"{PARTICIPANT_PREFIX}{i:0{width}d}" for i in table.pop("participant")],
    )
    return table


def cohort_table(n: int, *, seed: int = 0) -> pd.DataFrame:
    """The sessions :func:`write_cohort` writes for ``n`` and ``seed``.

    Returns:
        :func:`sample_ages` drawn from a generator derived from ``seed``, with one extra
        column ``session_seed``: the index of the session's own random stream.
    """
    _check_count(n)
    _check_seed(seed)
    table = sample_ages(
        n, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_AGES_STREAM,)))
    )
    table["session_seed"] = np.arange(n)
    return table


def _draw_participant(rng: np.random.Generator) -> tuple[float, list[float], str]:
    """Birth age, scan ages (weeks) and sex of one participant."""
    sex = "female" if rng.random() < 0.5 else "male"
    lowest, highest = SCAN_AGE_RANGE
    if rng.random() >= P_PRETERM_PARTICIPANT:
        birth = _truncated(
            lambda: rng.normal(TERM_BIRTH_MEAN, TERM_BIRTH_SD), PRETERM_BIRTH_AGE, TERM_BIRTH_MAX
        )
        scan = _truncated(lambda: birth + rng.gamma(TERM_GAP_SHAPE, TERM_GAP_SCALE), birth, highest)
        return birth, [scan], sex
    a, b = PRETERM_BIRTH_BETA
    birth = _truncated(
        lambda: PRETERM_BIRTH_AGE - PRETERM_BIRTH_SPAN * rng.beta(a, b),
        PRETERM_BIRTH_AGE - PRETERM_BIRTH_SPAN,
        PRETERM_BIRTH_AGE - 10.0**-AGE_DECIMALS,
    )
    first = _truncated(
        lambda: birth + rng.gamma(PRETERM_GAP_SHAPE, PRETERM_GAP_SCALE), max(birth, lowest), highest
    )
    scans = [first]
    # Draw the coin even when it cannot be used, so later participants do not shift.
    comes_back = rng.random() < P_SECOND_SESSION
    if comes_back and first < PRETERM_BIRTH_AGE:
        low = max(TERM_EQUIVALENT_RANGE[0], first + MIN_WEEKS_BETWEEN_SESSIONS)
        scans.append(
            _truncated(
                lambda: rng.normal(TERM_EQUIVALENT_MEAN, TERM_EQUIVALENT_SD),
                low,
                TERM_EQUIVALENT_RANGE[1],
            )
        )
    return birth, scans, sex


def _truncated(draw: Callable[[], float], low: float, high: float) -> float:
    """Redraw ``draw()`` until, rounded to :data:`AGE_DECIMALS`, it lies in ``[low, high]``."""
    while True:
        value = round(float(draw()), AGE_DECIMALS)
        if low <= value <= high:
            return value


# =============================================================================================
# Growth curves
# =============================================================================================


def brain_volume_ml(scan_age: float) -> float:
    """Mean brain volume (mL) of the phantom at ``scan_age`` weeks PMA, before jitter.

    Linear growth of :data:`BRAIN_ML_PER_WEEK` through 400 mL at 40 weeks: 160 mL at 28 and
    480 mL at 44 weeks. "Brain" is :data:`BRAIN_LABELS`: tissue and ventricles.
    """
    return TERM_BRAIN_ML + BRAIN_ML_PER_WEEK * (scan_age - TERM_AGE)


def myelination(scan_age: float | np.ndarray) -> float | np.ndarray:
    """Myelination index in [0, 1] at ``scan_age`` weeks PMA (logistic, 0.5 at 40 weeks)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(scan_age) - MYELIN_MIDPOINT) / MYELIN_WIDTH))


def folding(scan_age: float) -> float:
    """Sulcal depth at ``scan_age`` weeks PMA relative to its maximum, in [0, 1] (logistic)."""
    return float(1.0 / (1.0 + math.exp(-(scan_age - FOLDING_MIDPOINT) / FOLDING_WIDTH)))


def _ramp(age: float, ages: tuple[float, float]) -> float:
    """0 at ``ages[0]``, 1 at ``ages[1]``, linear between and clamped outside."""
    return float(np.clip((age - ages[0]) / (ages[1] - ages[0]), 0.0, 1.0))


def _lerp(values: tuple[float, float], weight: float) -> float:
    return values[0] + (values[1] - values[0]) * weight


# =============================================================================================
# Grid
# =============================================================================================


def grid_shape(voxel_size: float) -> tuple[int, int, int]:
    """Grid covering the dHCP field of view :data:`FOV_MM` at ``voxel_size`` mm.

    Args:
        voxel_size: isotropic voxel size in mm, within :data:`VOXEL_SIZE_RANGE`.

    Returns:
        ``(X, Y, Z)``: the field of view divided by the voxel size, rounded half up;
        ``(217, 290, 290)`` at the dHCP's 0.5 mm and ``(72, 97, 97)`` at 1.5 mm.

    Raises:
        ConfigError: if ``voxel_size`` is not a number within :data:`VOXEL_SIZE_RANGE`.
    """
    _check_voxel_size(voxel_size)
    x, y, z = (int(math.floor(fov / voxel_size + 0.5)) for fov in FOV_MM)
    return x, y, z


def grid_affine(voxel_size: float) -> np.ndarray:
    """Voxel-to-world matrix (4 x 4, RAS+, mm) of :func:`grid_shape`, origin at its centre."""
    shape = np.array(grid_shape(voxel_size))
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -voxel_size * (shape - 1) / 2.0
    return affine


def _axis_mm(length: int, voxel_size: float) -> np.ndarray:
    """World coordinates (mm) of the voxel centres along one axis, centred on 0."""
    return ((np.arange(length) - (length - 1) / 2.0) * voxel_size).astype(np.float32)


def _gaussian_weights(coords: np.ndarray, nodes: np.ndarray, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian interpolation weights, shape ``(len(coords), len(nodes))``."""
    weights = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / sigma) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _control_nodes(spacing: float) -> list[np.ndarray]:
    """Control-point positions (mm) along each axis, covering the field of view plus margin."""
    nodes = []
    for fov in FOV_MM:
        count = math.ceil(fov / spacing) + 3
        nodes.append(((np.arange(count) - (count - 1) / 2.0) * spacing).astype(np.float32))
    return nodes


def _smooth_field(
    coeffs: np.ndarray, spacing: float, shape: Sequence[int], voxel_size: float
) -> np.ndarray:
    """A smooth field (float32, ``shape``) from control coefficients, by separable weights.

    Three small matrix products instead of a 3-D interpolation keep this cheap even on the
    dHCP grid, and the field is defined in mm, so it does not depend on the voxel size.
    """
    nodes = _control_nodes(spacing)
    wx, wy, wz = (
        _gaussian_weights(_axis_mm(length, voxel_size), node, 0.8 * spacing)
        for length, node in zip(shape, nodes, strict=True)
    )
    field = np.tensordot(wx, coeffs.astype(np.float32), axes=(1, 0))  # (X, ny, nz)
    field = np.tensordot(field, wy, axes=(1, 1))  # (X, nz, Y)
    return np.ascontiguousarray(np.tensordot(field, wz, axes=(1, 1)))  # (X, Y, Z)


# =============================================================================================
# Subject parameters
# =============================================================================================


@dataclass(frozen=True)
class _Anatomy:
    """Every random and age-dependent shape parameter of one subject (no voxel grid)."""

    scale: np.ndarray  # (3,) template mm -> world mm
    rotation: np.ndarray  # (3, 3) world -> template orientation
    centre: np.ndarray  # (3,) world mm of the template origin
    warp: np.ndarray  # (3, nx, ny, nz) control coefficients, mm
    sulcal_directions: np.ndarray  # (K, 3) wave vectors on the unit sphere
    sulcal_phases: np.ndarray  # (K,)
    depth_directions: np.ndarray  # (L, 3)
    depth_phases: np.ndarray  # (L,)
    sulcal_depth: float  # template mm
    sylvian_depth: float
    sylvian_width: float
    cerebellum_scale: float
    ventricle_scale: float
    bilateral: dict[str, np.ndarray]  # name -> (2, 4): per side x/y/z shift (mm), log size
    csf_mm: float
    shell_mm: float
    cortex_mm: float
    fissure_half_width: float


@dataclass(frozen=True)
class _Appearance:
    jitter: dict[str, dict[int, float]]  # modality -> label -> intensity factor
    myelin: float
    central_myelin: float
    folium_contrast: float
    bias: dict[str, np.ndarray]  # modality -> control coefficients
    snr: dict[str, float]
    scanner_scale: dict[str, float]


_BILATERAL = ("thalamus", "lentiform", "caudate", "ventricle", "hippocampus", "cerebellum")


def _clipped_normal(rng: np.random.Generator, sd: float, size: int | tuple[int, ...] | None = None):
    return np.clip(rng.normal(0.0, sd, size), -JITTER_CLIP * sd, JITTER_CLIP * sd)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix from small angles (degrees) about x, y and z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _prematurity(scan_age: float, birth_age: float | None) -> float:
    """0 for term birth, 1 for birth at or before 29 weeks; scaled by time since birth."""
    if birth_age is None:
        return 0.0
    weight = 1.0 - _ramp(birth_age, PREMATURITY_BIRTH_AGES)
    # The effects of preterm birth build up ex utero: none on the day of birth.
    return weight * _ramp(scan_age - birth_age, (0.0, 4.0))


def _draw_anatomy(scan_age: float, birth_age: float | None, rng: np.random.Generator) -> _Anatomy:
    """Draw the shape of one subject; the order of draws is part of the seed contract."""
    premature = _prematurity(scan_age, birth_age)
    immature = 1.0 - _ramp(scan_age, IMMATURITY_AGES)
    template_ml = TEMPLATE_BRAIN_ML + TEMPLATE_BRAIN_ML_PER_WEEK * (scan_age - TERM_AGE)
    linear = (brain_volume_ml(scan_age) / template_ml) ** (1.0 / 3.0)
    scale = linear * np.exp(_clipped_normal(rng, SIZE_SD) + _clipped_normal(rng, AXIS_SD, 3))
    rotation = _rotation(_clipped_normal(rng, ROTATION_SD_DEG, 3))
    centre = np.array(SUBJECT_CENTRE) + _clipped_normal(rng, TRANSLATION_SD_MM, 3)
    warp = rng.normal(0.0, WARP_SD_MM, (3, *(len(n) for n in _control_nodes(WARP_SPACING_MM))))
    directions = rng.normal(size=(SULCAL_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2.0 * math.pi, SULCAL_WAVES)
    depth_directions = rng.normal(size=(SULCAL_DEPTH_WAVES, 3))
    depth_directions /= np.linalg.norm(depth_directions, axis=1, keepdims=True)
    depth_phases = rng.uniform(0.0, 2.0 * math.pi, SULCAL_DEPTH_WAVES)
    fold = folding(scan_age) * (1.0 + PREMATURITY_FOLDING * premature)
    ventricles = VENTRICLE_IMMATURE_SCALE**immature * (1.0 + PREMATURITY_VENTRICLES * premature)
    ventricles *= math.exp(float(_clipped_normal(rng, VENTRICLE_SIZE_SD)))
    bilateral = {}
    for name in _BILATERAL:
        jitter = np.empty((2, 4))
        jitter[:, :3] = _clipped_normal(rng, BILATERAL_SHIFT_MM, (2, 3))
        jitter[:, 3] = _clipped_normal(rng, BILATERAL_SIZE_SD, 2)
        bilateral[name] = jitter
    fraction = CEREBELLUM_FRACTION_TERM + CEREBELLUM_FRACTION_PER_WEEK * (scan_age - TERM_AGE)
    csf = _lerp(CSF_MM, 1.0 - immature) * (1.0 + PREMATURITY_CSF * premature)
    shell = _lerp(SHELL_MM, _ramp(scan_age, GROWTH_AGES))
    return _Anatomy(
        scale=_fit_in_view(scale, centre, csf + shell),
        rotation=rotation,
        centre=centre,
        warp=warp,
        sulcal_directions=directions,
        sulcal_phases=phases,
        depth_directions=depth_directions,
        depth_phases=depth_phases,
        sulcal_depth=SULCAL_DEPTH * fold,
        sylvian_depth=_lerp(SYLVIAN_DEPTH, fold),
        sylvian_width=_lerp(SYLVIAN_WIDTH, fold),
        cerebellum_scale=(fraction / CEREBELLUM_FRACTION_TERM) ** (1.0 / 3.0),
        ventricle_scale=ventricles,
        bilateral=bilateral,
        csf_mm=csf,
        shell_mm=shell,
        cortex_mm=_lerp(CORTEX_MM, _ramp(scan_age, GROWTH_AGES)),
        fissure_half_width=FISSURE_HALF_WIDTH * csf / CSF_MM[1],
    )


def _fit_in_view(scale: np.ndarray, centre: np.ndarray, padding: float) -> np.ndarray:
    """Shrink left-right and anterior-posterior scales that would push the head out of view.

    Only the largest heads of the oldest infants are affected; like dHCP's, the field of view
    is tight around them.
    """
    fitted = scale.copy()
    for axis, extent in enumerate(HEAD_HALF_EXTENT):
        room = FOV_MM[axis] / 2.0 - FOV_MARGIN_MM - abs(centre[axis]) - padding
        fitted[axis] = min(scale[axis], room / extent)
    return fitted


def _draw_appearance(scan_age: float, rng: np.random.Generator) -> _Appearance:
    """Draw contrast, bias field, noise level and scanner scale of one subject."""
    jitter = {}
    for key, table in _CONTRAST.items():
        factors = np.exp(_clipped_normal(rng, CONTRAST_SD, len(table)))
        jitter[key] = dict(zip(table, factors.tolist(), strict=True))
    shape = tuple(len(n) for n in _control_nodes(BIAS_SPACING_MM))
    bias = {key: rng.normal(0.0, BIAS_SD, shape) for key in MODALITIES}
    snr = {key: float(rng.uniform(*SNR_RANGE)) for key in bias}
    scanner = {key: float(rng.uniform(*SCANNER_SCALE_RANGE)) for key in bias}
    return _Appearance(
        jitter=jitter,
        myelin=float(myelination(scan_age)),
        central_myelin=float(myelination(scan_age + CENTRAL_MYELIN_LEAD)),
        folium_contrast=FOLIUM_CONTRAST * (0.3 + 0.7 * folding(scan_age)),
        bias=bias,
        snr=snr,
        scanner_scale=scanner,
    )


# =============================================================================================
# Implicit shapes (template mm; negative inside)
# =============================================================================================


def _ellipsoid(p: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence) -> np.ndarray:
    """Approximate signed distance to an ellipsoid, exact near its surface.

    ``semi`` items may be arrays broadcastable with ``p`` (for tapered shapes).
    """
    shape = np.broadcast_shapes(*(np.shape(pi) for pi in p))
    k0 = np.zeros(shape, dtype=np.float32)  # |q|^2, then |q|, with q = (p - centre) / semi
    k1 = np.zeros(shape, dtype=np.float32)  # |q / semi|^2, then its root
    # In place, one axis at a time: on the dHCP grid every temporary costs 73 MB.
    for pi, ci, ai in zip(p, centre, semi, strict=True):
        ai = _scalar(ai)
        q = pi - np.float32(ci)
        q /= ai
        k0 += q * q
        q /= ai
        q *= q
        k1 += q
        del q
    np.sqrt(k0, out=k0)
    np.sqrt(k1, out=k1)
    np.maximum(k1, np.float32(1e-6), out=k1)
    distance = k0 - np.float32(1.0)
    distance *= k0
    distance /= k1
    return distance


def _scalar(value):
    """A Python float for a NumPy scalar, so it does not promote float32 arrays to float64."""
    return float(value) if np.ndim(value) == 0 else value


def _tube(p: Sequence[np.ndarray], axis: Sequence[tuple[Sequence[float], float]]) -> np.ndarray:
    """Signed distance to a tube of varying radius along the polyline ``axis``."""
    best = None
    for start, end in zip(axis[:-1], axis[1:], strict=True):
        d = _cone(p, start, end)
        best = d if best is None else np.minimum(best, d)
    return best


def _cone(p: Sequence[np.ndarray], start, end) -> np.ndarray:
    """Signed distance to a capsule whose radius varies linearly from ``start`` to ``end``.

    Both are ``(point, radius)`` pairs in template mm.
    """
    (a, ra), (b, rb) = start, end
    a = [float(ai) for ai in a]
    ab = [float(bi) - ai for bi, ai in zip(b, a, strict=True)]
    length2 = sum(d * d for d in ab)
    t = (p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]
    t = np.clip(t / length2, 0.0, 1.0)
    dist2 = sum((pi - ai - t * di) ** 2 for pi, ai, di in zip(p, a, ab, strict=True))
    return np.sqrt(dist2) - (float(ra) + t * float(rb - ra))


def _mirror(points: Sequence[float], side: int) -> tuple[float, float, float]:
    return (side * points[0], points[1], points[2])


class _Space:
    """Template coordinates of every voxel of one subject, and boxes around structures."""

    def __init__(self, anatomy: _Anatomy, voxel_size: float) -> None:
        self.anatomy = anatomy
        self.voxel_size = voxel_size
        self.shape = grid_shape(voxel_size)
        axes = [_axis_mm(n, voxel_size) for n in self.shape]
        rel = [axis - c for axis, c in zip(axes, anatomy.centre, strict=True)]
        grids = [
            rel[0][:, None, None],
            rel[1][None, :, None],
            rel[2][None, None, :],
        ]
        self.p: list[np.ndarray] = []
        largest = []
        for row, scale, coeffs in zip(anatomy.rotation, anatomy.scale, anatomy.warp, strict=True):
            # The warp is drawn in the template's orientation, so adding it after rotating is
            # as random as before, and saves two full-size temporaries.
            comp = _smooth_field(coeffs, WARP_SPACING_MM, self.shape, voxel_size)
            largest.append(float(np.abs(comp).max()))
            for weight, grid in zip(row, grids, strict=True):
                comp += np.float32(weight) * grid
            comp *= np.float32(1.0 / scale)
            self.p.append(comp)
        self.max_warp = math.hypot(*largest)
        self.mean_scale = float(np.exp(np.log(anatomy.scale).mean()))

    def box(self, centre: Sequence[float], radius: float, margin: float = 0.0) -> Slices3:
        """Voxel slices holding a template ball (mm) and ``margin`` world mm around it."""
        a = self.anatomy
        world = a.centre + a.rotation.T @ (a.scale * np.asarray(centre))
        reach = radius * a.scale.max() + self.max_warp + margin + 2.0 * self.voxel_size
        slices = []
        for c, n in zip(world, self.shape, strict=True):
            lo = (c - reach) / self.voxel_size + (n - 1) / 2.0
            hi = (c + reach) / self.voxel_size + (n - 1) / 2.0
            slices.append(
                slice(int(np.clip(math.floor(lo), 0, n)), int(np.clip(math.ceil(hi) + 1, 0, n)))
            )
        x, y, z = slices
        return x, y, z

    def coords(self, box: Slices3) -> list[np.ndarray]:
        return [p[box] for p in self.p]


# =============================================================================================
# Segmentation
# =============================================================================================


def _cerebrum_semi_axes(p: Sequence[np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
    """Local semi-axes (template mm) of the cerebrum at points ``p``.

    An ellipsoid made egg-shaped (wider at the back), flatter below than above, with the
    temporal lobes hanging lower at the sides.
    """
    rx, ry, rz_up, rz_down = CEREBRUM_SEMI_AXES
    (lateral, lateral_width), (anterior, anterior_width), drop = TEMPORAL_LOBES
    x, y = np.abs(p[0]) / np.float32(rx), p[1] / np.float32(ry)
    temporal = np.exp(
        -(((x - lateral) / lateral_width) ** 2) - ((y - anterior) / anterior_width) ** 2
    )
    down = np.float32(rz_down) * (1.0 + np.float32(drop) * temporal)
    widening = 1.0 - CEREBRUM_OCCIPITAL_WIDENING * np.clip(y, -1.0, 1.0)
    return np.float32(rx) * widening, ry, np.where(p[2] > 0, np.float32(rz_up), down)


def _cerebrum_smooth(p: Sequence[np.ndarray]) -> np.ndarray:
    """Unfolded cerebrum, without fissure: approximate signed distance (template mm)."""
    return _ellipsoid(p, (0.0, 0.0, 0.0), _cerebrum_semi_axes(p))


def _cerebellum(p: Sequence[np.ndarray], anatomy: _Anatomy) -> np.ndarray:
    """Two hemispheres and a vermis, grown about :data:`CEREBELLUM_GROWTH_CENTRE`."""
    k = anatomy.cerebellum_scale
    g = CEREBELLUM_GROWTH_CENTRE
    q = [g_i + (p_i - g_i) / k for p_i, g_i in zip(p, g, strict=True)]
    dist = _ellipsoid(q, *VERMIS)
    centre, semi = CEREBELLUM_HEMISPHERE
    for side, jitter in zip((1, -1), anatomy.bilateral["cerebellum"], strict=True):
        size = math.exp(jitter[3])
        shifted = np.add(_mirror(centre, side), jitter[:3])
        dist = np.minimum(dist, _ellipsoid(q, shifted, [s * size for s in semi]))
    return dist * k


def _sulcal_indent(p: Sequence[np.ndarray], anatomy: _Anatomy) -> np.ndarray:
    """Depth (template mm) by which sulci push the cerebral surface in, at points ``p``.

    The pattern depends only on the direction from the centre of the cerebrum, so each
    sulcus is a sheet running straight into the brain. Sulci follow the zero crossings of a
    sum of random plane waves on the unit sphere; a second, slower field makes some of them
    deep (primary) and others shallow, so that they appear to end.
    """
    u = _directions(p)
    radius = float(np.prod(CEREBRUM_SEMI_AXES[:2]) * np.mean(CEREBRUM_SEMI_AXES[2:])) ** (1 / 3)
    pattern = _waves(u, anatomy.sulcal_directions, anatomy.sulcal_phases, radius, SULCAL_WAVELENGTH)
    depth = _waves(
        u, anatomy.depth_directions, anatomy.depth_phases, radius, SULCAL_DEPTH_WAVELENGTH
    )
    depth = anatomy.sulcal_depth * (1.0 - SULCAL_DEPTH_VARIATION * (0.5 - 0.5 * np.tanh(depth)))
    # A smoothstep profile across the sulcus: steep walls and a rounded floor.
    t = np.clip(np.abs(pattern) / SULCAL_WIDTH, 0.0, 1.0)
    indent = depth * (1.0 - t * t * (3.0 - 2.0 * t))
    # Sylvian fissure: a groove on the lateral surface, wide open before term.
    (y0, z0), (y1, z1) = SYLVIAN_LINE
    dy, dz = y1 - y0, z1 - z0
    t = np.clip(((u[1] - y0) * dy + (u[2] - z0) * dz) / (dy * dy + dz * dz), 0.0, 1.0)
    off = np.sqrt((u[1] - y0 - t * dy) ** 2 + (u[2] - z0 - t * dz) ** 2)
    lateral = np.clip((np.abs(u[0]) - SYLVIAN_LATERAL[0]) / SYLVIAN_LATERAL[1], 0.0, 1.0)
    sylvian = anatomy.sylvian_depth * lateral * np.exp(-((off / anatomy.sylvian_width) ** 2))
    centre, semi, fade = SULCUS_FREE_CORE
    outside_core = np.clip(_ellipsoid(p, centre, semi) / fade, 0.0, 1.0)
    return np.maximum(indent, sylvian) * outside_core


def _directions(p: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Unit vectors from the centre of the cerebrum, in its normalised (spherical) frame."""
    rx, ry, rz = _cerebrum_semi_axes(p)
    u = [p[0] / rx, p[1] / ry, p[2] / rz]
    norm = np.maximum(np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2), 1e-6)
    return [ui / norm for ui in u]


def _waves(u, directions: np.ndarray, phases: np.ndarray, radius: float, wavelength: float):
    """Unit-variance sum of plane waves of ``wavelength`` mm on a sphere of ``radius`` mm."""
    frequency = np.float32(2.0 * math.pi * radius / wavelength)
    field = np.zeros_like(u[0])
    for direction, phase in zip(directions, phases, strict=True):
        arg = direction[0] * u[0] + direction[1] * u[1] + direction[2] * u[2]
        field += np.cos(frequency * arg + np.float32(phase))
    field *= np.float32(math.sqrt(2.0 / len(phases)))
    return field


def _paint_tube(
    dseg, space: _Space, axis, label: int, scale: float, jitter: np.ndarray, side: int
) -> None:
    """Paint one side of a bilateral tube (ventricle, hippocampus) into ``dseg``."""
    size = scale * math.exp(jitter[3])
    moved = [(np.add(_mirror(point, side), jitter[:3]), radius * size) for point, radius in axis]
    # One small box per segment: a box around the whole curved tube would be mostly empty.
    for (a, ra), (b, rb) in zip(moved[:-1], moved[1:], strict=True):
        box = space.box((a + b) / 2.0, np.linalg.norm(b - a) / 2.0 + max(ra, rb))
        dseg[box][_cone(space.coords(box), (a, ra), (b, rb)) < 0] = label


def _paint_deep_grey(dseg: np.ndarray, space: _Space) -> None:
    for (centre, semi), name in zip(DEEP_GREY, ("thalamus", "lentiform", "caudate"), strict=True):
        for side, jitter in zip((1, -1), space.anatomy.bilateral[name], strict=True):
            moved = np.add(_mirror(centre, side), jitter[:3])
            size = [r * math.exp(jitter[3]) for r in semi]
            box = space.box(moved, max(size))
            dseg[box][_ellipsoid(space.coords(box), moved, size) < 0] = DGM


@dataclass
class _Labels:
    """A segmentation and the per-voxel facts its intensities need.

    ``shell_depth``, ``wm_radius`` and ``folia`` hold one value per voxel of label 4, 3 and 6
    respectively, in C order: the fraction of the way from brain to head surface, the
    normalised radius of the cerebrum (0 centre, 1 surface), and the cerebellar texture.
    """

    dseg: np.ndarray
    shell_depth: np.ndarray
    wm_radius: np.ndarray
    folia: np.ndarray


def _segment(space: _Space) -> _Labels:
    """Label every voxel of ``space``: priority painting of implicit shapes."""
    a = space.anatomy
    s = np.float32(space.mean_scale)
    p = space.p
    margin = a.csf_mm + a.shell_mm + space.voxel_size  # world mm around the brain
    cerebellum_box = space.box(CEREBELLUM_GROWTH_CENTRE, 36.0 * a.cerebellum_scale, margin)
    cerebellum = _cerebellum(space.coords(cerebellum_box), a)
    stem_box = space.box(BRAINSTEM_BALL[0], BRAINSTEM_BALL[1], margin)
    stem = _tube(space.coords(stem_box), BRAINSTEM_AXIS)

    # Extracerebral CSF and the non-brain shell lie within fixed distances (world mm) of the
    # unfolded brain surface.
    smooth = _cerebrum_smooth(p)
    envelope = smooth * s
    np.minimum(envelope[cerebellum_box], cerebellum * s, out=envelope[cerebellum_box])
    np.minimum(envelope[stem_box], stem * s, out=envelope[stem_box])
    envelope -= np.float32(a.csf_mm)
    dseg = np.full(space.shape, OUTSIDE, dtype=np.uint8)
    dseg[envelope < a.shell_mm] = NON_BRAIN
    # Below the brain the head does not end in a thin shell but in the skull base and neck.
    base_box = space.box(SKULL_BASE[0], max(SKULL_BASE[1]))
    dseg[base_box][_ellipsoid(space.coords(base_box), *SKULL_BASE) < 0] = NON_BRAIN
    dseg[envelope < 0] = CSF
    shell_depth = envelope[dseg == NON_BRAIN] / np.float32(a.shell_mm)
    del envelope

    # Cerebrum: the unfolded shape minus fissure, cerebellum and lower brainstem, then sulci.
    cerebrum = smooth
    np.maximum(cerebrum, -_fissure(p, a.fissure_half_width / s), out=cerebrum)
    gap = np.float32(TENTORIUM_GAP) / s
    np.maximum(cerebrum[cerebellum_box], gap - cerebellum, out=cerebrum[cerebellum_box])
    lower_stem = _intersect(stem, space.coords(stem_box)[2] - np.float32(CEREBRUM_BASE_Z))
    np.maximum(cerebrum[stem_box], gap - lower_stem, out=cerebrum[stem_box])
    # Sulci only push the surface inwards, so only the outer layer of the cerebrum matters.
    near_surface = (cerebrum > -(max(a.sulcal_depth, a.sylvian_depth) + 1.0)) & (cerebrum < 0)
    cerebrum[near_surface] += _sulcal_indent([pi[near_surface] for pi in p], a)
    del near_surface
    inside = cerebrum < 0
    del cerebrum
    dseg[inside] = WM
    _paint_cortex(dseg, inside, a.cortex_mm, space.voxel_size)
    del inside

    dseg[cerebellum_box][cerebellum < 0] = CEREBELLUM
    dseg[stem_box][stem < 0] = BRAINSTEM
    _paint_deep_grey(dseg, space)
    sides = zip((1, -1), a.bilateral["hippocampus"], a.bilateral["ventricle"], strict=True)
    for side, hippocampus, ventricle in sides:
        _paint_tube(dseg, space, HIPPOCAMPUS_AXIS, HIPPOCAMPI, 1.0, hippocampus, side)
        _paint_tube(dseg, space, VENTRICLE_AXIS, VENTRICLES, a.ventricle_scale, ventricle, side)
        _paint_tube(dseg, space, TEMPORAL_HORN_AXIS, VENTRICLES, a.ventricle_scale, ventricle, side)

    white = dseg == WM
    wm_radius = _cerebrum_radius([pi[white] for pi in p])
    del white
    # Label 6 lies inside its box, and C order within a box is C order in the whole grid.
    cerebellar = dseg[cerebellum_box] == CEREBELLUM
    folia = _folia([pi[cerebellar] for pi in space.coords(cerebellum_box)], space)
    return _Labels(dseg, shell_depth, wm_radius, folia)


def _fissure(p: Sequence[np.ndarray], half_width: float) -> np.ndarray:
    """Signed distance (template mm) to the interhemispheric fissure above the callosal core."""
    (cy, cz), (ay, az) = CALLOSAL_CORE
    core = _ellipse(p[1], p[2], (cy, cz), (ay, az))
    return _intersect(np.abs(p[0]) - np.float32(half_width), -core)


def _intersect(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Signed distance to the intersection of two regions with roughly orthogonal walls.

    The plain maximum underestimates the distance outside a corner, which would let sulci
    cut far too deep near the fissure and the cisterns.
    """
    corner = np.sqrt(np.maximum(first, 0.0) ** 2 + np.maximum(second, 0.0) ** 2)
    return np.where((first > 0) & (second > 0), corner, np.maximum(first, second))


def _ellipse(
    y: np.ndarray, z: np.ndarray, centre: tuple[float, float], semi: tuple[float, float]
) -> np.ndarray:
    """Approximate signed distance to an ellipse in the (y, z) plane (a cylinder along x)."""
    qy, qz = (y - centre[0]) / semi[0], (z - centre[1]) / semi[1]
    k0 = np.sqrt(qy**2 + qz**2)
    k1 = np.sqrt((qy / semi[0]) ** 2 + (qz / semi[1]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _paint_cortex(
    dseg: np.ndarray, inside: np.ndarray, thickness: float, voxel_size: float
) -> None:
    """Relabel the outer ``thickness`` mm of the cerebrum ``inside`` as cortex, in place.

    A Euclidean distance transform keeps the ribbon equally thick on the crowns and the
    walls of the gyri, where a shifted level set would thin it.
    """
    box = ndimage.find_objects(inside.view(np.uint8))[0]
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
    depth = ndimage.distance_transform_edt(inside[box], sampling=voxel_size)
    # Voxel centres lie half a voxel inside the surface they sample.
    dseg[box][inside[box] & (depth < thickness + 0.5 * voxel_size)] = CGM


def _cerebrum_radius(p: Sequence[np.ndarray]) -> np.ndarray:
    """Normalised ellipsoidal radius of points in the cerebrum: 0 at its centre, 1 outside."""
    rx, ry, rz = _cerebrum_semi_axes(p)
    radius = np.sqrt((p[0] / rx) ** 2 + (p[1] / ry) ** 2 + (p[2] / rz) ** 2)
    return np.minimum(radius, 1.0).astype(np.float32)


def _folia(p: Sequence[np.ndarray], space: _Space) -> np.ndarray:
    """Cerebellar texture in [-1, 1] at points ``p``: folia, 1 (white matter) in the core.

    Folia are shells around the centre of each hemisphere, about
    :data:`CEREBELLAR_FOLIUM_MM` apart.
    """
    k = space.anatomy.cerebellum_scale
    g = np.asarray(CEREBELLUM_GROWTH_CENTRE)
    centre, semi = CEREBELLUM_HEMISPHERE
    dist = None
    for side in (1, -1):
        c = g + k * (np.asarray(_mirror(centre, side)) - g)
        d = np.sqrt(sum((pi - ci) ** 2 for pi, ci in zip(p, c, strict=True)))
        dist = d if dist is None else np.minimum(dist, d)
    # Irregular spacing, so the folia read as lamellae rather than tree rings.
    dist = dist + np.float32(FOLIUM_JITTER_MM) * np.sin(
        np.float32(0.45) * (p[0] + p[2]) + p[1] * 0.2
    )
    texture = np.cos(np.float32(2.0 * math.pi * space.mean_scale / CEREBELLAR_FOLIUM_MM) * dist)
    texture[dist < CEREBELLAR_CORE * min(semi) * k] = 1.0
    return texture.astype(np.float32)


# =============================================================================================
# Images
# =============================================================================================


def _clean_image(key: str, labels: _Labels, look: _Appearance) -> np.ndarray:
    """Noise-free image ``key`` (``"t1w"``/``"t2w"``), float32, before blur."""
    table, jitter = _CONTRAST[key], look.jitter[key]
    lut = np.zeros(len(DRAWEM9), dtype=np.float32)
    for label, values in table.items():
        lut[label] = _lerp(values, look.myelin) * jitter[label]
    dseg = labels.dseg
    image = lut[dseg]
    depth = labels.shell_depth
    layers = np.where(depth < SKULL_FRACTION, SKULL[key], SCALP[key])
    image[dseg == NON_BRAIN] = np.where(depth > 1.0, SOFT_TISSUE[key], layers)
    # Central white matter myelinates first.
    local = look.myelin + (look.central_myelin - look.myelin) * (1.0 - labels.wm_radius)
    low, high = table[WM]
    image[dseg == WM] = (low + (high - low) * local) * jitter[WM]
    # Texture +1 is white-matter-like: darker on T2w, brighter on T1w.
    sign = -1.0 if key == "t2w" else 1.0
    image[dseg == CEREBELLUM] *= 1.0 + sign * look.folium_contrast * labels.folia
    return image


def _acquire(
    image: np.ndarray,
    key: str,
    head: np.ndarray,
    look: _Appearance,
    voxel_size: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Partial-volume blur, bias field, Rician noise and scanner scale; 0 outside the head."""
    image = ndimage.gaussian_filter(image, PV_SIGMA_VOXELS, mode="constant")
    image *= np.exp(_smooth_field(look.bias[key], BIAS_SPACING_MM, image.shape, voxel_size))
    sigma = np.float32(_lerp(_CONTRAST[key][WM], look.myelin) / look.snr[key])
    # Rician noise: the magnitude of the signal plus complex Gaussian noise.
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= sigma
    real += image
    np.square(real, out=real)
    imag = rng.standard_normal(image.shape, dtype=np.float32)
    imag *= sigma
    np.square(imag, out=imag)
    real += imag
    del imag
    np.sqrt(real, out=image)
    del real
    image *= np.float32(look.scanner_scale[key])
    # The release keeps 0 for outside the head; a float32 magnitude of exactly 0 inside it is
    # astronomically unlikely, but cheap to rule out.
    np.maximum(image, np.finfo(np.float32).tiny, out=image, where=head)
    image[~head] = 0.0
    return image


def brain_mask_from_labels(dseg: np.ndarray) -> np.ndarray:
    """A brain mask made from drawem9 labels as the dHCP structural pipeline makes its own.

    Voxels of brain tissue and ventricles (labels other than 0, CSF 1 and non-brain 4) are
    dilated :data:`MASK_DILATIONS` times and eroded :data:`MASK_EROSIONS` times with a
    3 x 3 x 3 box, and enclosed holes are filled: a closed brain outline about one voxel
    wider than the tissue, holding the CSF of the fissures and sulci nearby.

    Args:
        dseg: drawem9 labels, shape ``(X, Y, Z)``.

    Returns:
        uint8 mask, 1 in the brain and 0 outside, shape ``(X, Y, Z)``.
    """
    tissue = ~np.isin(dseg, MASK_EXCLUDED_LABELS)
    mask = np.zeros(dseg.shape, dtype=np.uint8)
    if not tissue.any():
        return mask
    # work in the tissue's bounding box, with room for the dilation
    margin = MASK_DILATIONS + 1
    box = tuple(
        slice(max(int(idx.min()) - margin, 0), int(idx.max()) + margin + 1)
        for idx in np.nonzero(tissue)
    )
    # k passes of a 3 x 3 x 3 box are one pass of a (2k + 1)-wide box, which is separable
    closed = ndimage.maximum_filter(
        tissue[box].view(np.uint8), size=2 * MASK_DILATIONS + 1, mode="constant", cval=0
    )
    closed = ndimage.minimum_filter(closed, size=2 * MASK_EROSIONS + 1, mode="constant", cval=1)
    mask[box] = ndimage.binary_fill_holes(closed)
    return mask


def scanner_bias_field(
    shape: Sequence[int], voxel_size: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth positive multiplicative field: what bias correction takes out of an image.

    Args:
        shape: grid shape ``(X, Y, Z)`` in voxels.
        voxel_size: isotropic voxel size in mm; the field is defined in mm, so the same draw
            gives nearly the same field at any voxel size.
        rng: generator of the control coefficients.

    Returns:
        float32 field, shape ``shape``, with geometric mean 1 over the grid (log SD 0.07-0.19
        over the head).
    """
    nodes = _control_nodes(SCANNER_BIAS_SPACING_MM)
    coeffs = rng.normal(0.0, SCANNER_BIAS_SD, tuple(len(n) for n in nodes))
    field = _smooth_field(coeffs, SCANNER_BIAS_SPACING_MM, shape, voxel_size)
    field -= field.mean(dtype=np.float64)
    return np.exp(field, out=field)


def make_subject(
    scan_age: float,
    *,
    voxel_size: float = DHCP_VOXEL_SIZE,
    seed: int | np.random.Generator = 0,
    birth_age: float | None = None,
) -> PhantomSubject:
    """Draw one synthetic session in memory.

    Args:
        scan_age: post-menstrual age at scan in weeks, within :data:`SUPPORTED_AGE_RANGE`.
        voxel_size: isotropic voxel size in mm; 0.5 gives the dHCP grid ``(217, 290, 290)``.
        seed: seed or generator; the same seed, ages and voxel size give identical arrays,
            and the same seed and ages the same anatomy at any voxel size.
        birth_age: gestational age at birth in weeks, at most ``scan_age``; preterm birth
            (before 37 weeks) enlarges ventricles and extracerebral CSF and reduces folding
            a little. ``None`` is treated as term birth.

    Returns:
        The images, labels, affine and ages; see :class:`PhantomSubject`.

    Raises:
        ConfigError: if an age or the voxel size is out of range, or ``birth_age`` is after
            ``scan_age``.

    Example:
        >>> subject = make_subject(28.0, voxel_size=4.0, seed=3)
        >>> sorted(set(subject.dseg.ravel().tolist())) == list(range(10))
        True
    """
    _check_age("scan_age", scan_age)
    if birth_age is not None:
        _check_age("birth_age", birth_age, low=0.0)
        if birth_age > scan_age:
            raise ConfigError(
                f"birth_age must not be after scan_age, but got birth_age={birth_age} > "
                f"scan_age={scan_age}"
            )
    _check_voxel_size(voxel_size)
    rng = _as_generator(seed)
    anatomy = _draw_anatomy(float(scan_age), birth_age, rng)
    look = _draw_appearance(float(scan_age), rng)
    labels = _segment(_Space(anatomy, float(voxel_size)))
    head = labels.dseg != OUTSIDE
    images = {}
    for key in ("t2w", "t1w"):
        clean = _clean_image(key, labels, look)
        images[key] = _acquire(clean, key, head, look, float(voxel_size), rng)
    return PhantomSubject(
        t1w=images["t1w"],
        t2w=images["t2w"],
        dseg=labels.dseg,
        affine=grid_affine(voxel_size),
        scan_age=float(scan_age),
        birth_age=None if birth_age is None else float(birth_age),
        voxel_size=float(voxel_size),
    )


# =============================================================================================
# Files
# =============================================================================================


def write_cohort(
    out_dir: str | os.PathLike,
    n: int = 60,
    *,
    seed: int = 0,
    voxel_size: float = 1.5,
    progress: bool = True,
) -> Path:
    """Write a synthetic cohort of ``n`` sessions in the dHCP third-release layout.

    The layout is that of the release's ``derivatives/dhcp_anat_pipeline`` folder, with the
    tables next to the images (what :func:`neonb.data.read_manifest` reads)::

        ROOT/dataset_description.json        BIDS; "neonb_phantom" holds n, seed, voxel_size
        ROOT/participants.tsv                participant_id, birth_age, sex
        ROOT/sub-<id>/sub-<id>_sessions.tsv  session_id, scan_age
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_T2w.nii.gz
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_desc-restore_T2w.nii.gz
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_T1w.nii.gz
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_desc-restore_T1w.nii.gz
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_desc-drawem9_dseg.nii.gz
        ROOT/sub-<id>/ses-<id>/anat/sub-<id>_ses-<id>_desc-brain_mask.nii.gz

    The ``desc-restore`` images are :class:`PhantomSubject`'s; the plain ones are them times
    a smooth scanner field (:meth:`PhantomSubject.uncorrected`), drawn from a stream of its
    own so the restored images do not depend on it. The brain mask is
    :func:`brain_mask_from_labels` of the labels.

    As in dHCP, the tables hold bare labels (``SYN0001``, ``1``) and the paths prefixed ones
    (``sub-SYN0001``, ``ses-1``). Ages are in weeks PMA (:func:`cohort_table`). Images are
    gzipped NIfTI-1 (float32; dseg and brain mask uint8) with one RAS+ affine
    (:func:`grid_affine`).

    Every file is written under a temporary name and renamed, so an interrupted run leaves
    only complete files; running again completes the cohort. The same arguments always give
    byte-identical files, and each session's images depend only on ``seed`` and its position,
    not on ``n``. A complete cohort with the same parameters is returned as it is.

    Args:
        out_dir: the folder to write to (created if needed); empty, or a cohort written
            with the same parameters.
        n: number of sessions (scans), at least 1.
        seed: non-negative integer seed.
        voxel_size: isotropic voxel size in mm; 1.5 gives 72 x 97 x 97 voxels, 0.5 the
            dHCP grid 217 x 290 x 290.
        progress: show a tqdm progress bar.

    Returns:
        The root folder of the cohort.

    Raises:
        ConfigError: if an argument is out of range, or ``out_dir`` holds a cohort written
            with other parameters, or other files.
        DataError: if ``out_dir``'s ``dataset_description.json`` cannot be read.
    """
    _check_count(n)
    _check_seed(seed)
    _check_voxel_size(voxel_size)
    root = Path(out_dir).expanduser()
    params = {
        "n": int(n),
        "seed": int(seed),
        "voxel_size": float(voxel_size),
        "version": PHANTOM_VERSION,
    }
    _claim(root, params)
    table = cohort_table(n, seed=seed)
    todo = [row for row in table.itertuples(index=False) if not _session_complete(root, row)]
    if len(todo) < len(table):
        logger.info(
            "%s: %d of %d sessions already written, kept", root, len(table) - len(todo), len(table)
        )
    _write_tables(root, table)
    for row in tqdm(todo, desc="synthetic sessions", unit="session", disable=not progress):
        _write_session(root, row, seed, voxel_size)
    return root


def _session_paths(root: Path, row) -> dict[str, Path]:
    sub, ses = f"sub-{row.participant_id}", f"ses-{row.session_id}"
    anat = root / sub / ses / "anat"
    return {key: anat / f"{sub}_{ses}_{suffix}" for key, suffix in SUFFIXES.items()}


def _session_complete(root: Path, row) -> bool:
    return all(path.is_file() for path in _session_paths(root, row).values())


def _write_session(root: Path, row, seed: int, voxel_size: float) -> None:
    paths = _session_paths(root, row)
    next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(_SESSION_STREAM, int(row.session_seed)))
    )
    subject = make_subject(row.scan_age, voxel_size=voxel_size, seed=rng, birth_age=row.birth_age)
    scanner = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(_SCANNER_BIAS_STREAM, int(row.session_seed)))
    )
    arrays = {
        **{f"restore_{key}": getattr(subject, key) for key in MODALITIES},
        **subject.uncorrected(scanner),
        "dseg": subject.dseg,
        "brain_mask": subject.brain_mask,
    }
    for key, path in paths.items():
        image = _nifti(arrays[key], subject.affine)
        data = gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
        _atomic_write(path, data)


def _write_tables(root: Path, table: pd.DataFrame) -> None:
    """participants.tsv and one sessions.tsv per participant, unless already there."""
    participants = table.drop_duplicates("participant_id")[["participant_id", "birth_age", "sex"]]
    _write_tsv(root / "participants.tsv", participants)
    for participant, sessions in table.groupby("participant_id", sort=True):
        folder = root / f"sub-{participant}"
        folder.mkdir(exist_ok=True)
        _write_tsv(folder / f"sub-{participant}_sessions.tsv", sessions[["session_id", "scan_age"]])


def _write_tsv(path: Path, frame: pd.DataFrame) -> None:
    if not path.is_file():
        text = frame.to_csv(
            sep="\t", index=False, float_format=f"%.{AGE_DECIMALS}f", lineterminator="\n"
        )
        _atomic_write(path, text.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it to ``path``."""
    handle, tmp = tempfile.mkstemp(
        prefix=f"{_TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        os.fchmod(handle, default_file_mode())  # mkstemp makes it 0600; honour the umask
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _description(params: dict[str, object]) -> dict[str, object]:
    return {
        "Name": DATASET_NAME,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "License": "CC0",
        "GeneratedBy": [
            {
                "Name": "neonb",
                "Version": __version__,
                "Description": "neonb.phantom.write_cohort: synthetic neonatal brain MRI "
                "in the dHCP third-release layout",
            }
        ],
        "neonb_phantom": params,
    }


def _claim(root: Path, params: dict[str, object]) -> None:
    """Check ``root`` is free or holds this very cohort; mark a new one as ours."""
    description = root / "dataset_description.json"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir must be a folder, but {root} is a file")
    if description.is_file():
        try:
            stored = json.loads(description.read_text()).get("neonb_phantom")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as error:
            raise DataError(description, f"is not a readable JSON object ({error})") from error
        if stored is None:
            raise ConfigError(
                f"{root} holds a dataset not written by neonb.phantom; "
                "choose an empty or new folder"
            )
        if stored != params:
            found = ", ".join(f"{k}={stored.get(k)!r}" for k in params)
            asked = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(
                f"{root} holds a synthetic cohort written with {found}, but {asked} was asked; "
                "delete the folder or choose another one"
            )
        return
    # A temporary file may be another process claiming the same folder at the same time.
    if root.is_dir() and any(not p.name.startswith(_TMP_PREFIX) for p in root.iterdir()):
        raise ConfigError(
            f"{root} is not empty and has no dataset_description.json, so it is not a "
            "neonb synthetic cohort; choose an empty or new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_description(params), indent=2) + "\n"
    _atomic_write(description, text.encode())


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units(xyz="mm")
    image.set_qform(affine, code=QFORM_CODE)
    image.set_sform(affine, code=QFORM_CODE)
    image.header.set_data_dtype(array.dtype)
    return image


# =============================================================================================
# Validation
# =============================================================================================


def _check_count(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive integer (number of sessions), but got {n!r}")


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, but got {seed!r}")


def _check_voxel_size(voxel_size: object) -> None:
    low, high = VOXEL_SIZE_RANGE
    ok = isinstance(voxel_size, (int, float, np.number)) and not isinstance(voxel_size, bool)
    if not ok or not math.isfinite(voxel_size) or not low <= voxel_size <= high:
        raise ConfigError(
            f"voxel_size must be a number of mm in [{low}, {high}] (0.5 is the dHCP grid), "
            f"but got {voxel_size!r}"
        )


def _check_age(name: str, age: object, low: float | None = None) -> None:
    low = SUPPORTED_AGE_RANGE[0] if low is None else low
    high = SUPPORTED_AGE_RANGE[1]
    ok = isinstance(age, (int, float, np.number)) and not isinstance(age, bool)
    if not ok or not math.isfinite(age) or not low <= age <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}] weeks PMA, but got {age!r}")


def _as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    _check_seed(seed)
    return np.random.default_rng(seed)
