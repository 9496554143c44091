"""Tissue volumes against scan age: centile curves fitted on a training cohort's labels.

``neonb segment`` reports each tissue's volume; whether a volume is unusual depends on the
infant's age, since the neonatal brain grows fast (white matter roughly doubles between 30
and 40 weeks PMA). This module fits, per tissue, centile curves of volume against scan age
on a cohort's reference label images (:func:`fit_norms`), saves them as a small JSON file
in the model folder (:data:`NORMS_FILE`, :func:`save_norms`) and, for a new infant, gives
the centile of each volume at its scan age (:meth:`Norms.centile`).

**Method.** Linear quantile regression (Koenker & Bassett 1978; statsmodels ``QuantReg``)
of volume (mL) on a quadratic in scan age (weeks PMA, centred on the cohort's mean age),
one fit per quantile of :data:`QUANTILES` (3rd to 97th centile). Why this and not another
standard method:

* quantile regression models each centile directly, with no assumption on the shape of the
  distribution of volumes at an age (skewed, or spreading with age, as volumes do), which is
  what LMS/GAMLSS would need a family and three smooth curves for;
* a quadratic is the smallest polynomial that bends (growth slows towards term) and has three
  coefficients per quantile, which a few dozen sessions can support; a natural spline with
  knots would need hundreds of sessions to beat it, and the study's cohorts (60 synthetic
  sessions in the demo, 709 in the dHCP) sit at the low end;
* fitted quantile curves may cross where data are sparse; at prediction they are sorted
  (monotone rearrangement, Chernozhukov, Fernández-Val & Galichon 2010), which keeps each
  curve's fit and makes centiles monotone in volume.

**A centile** of a volume at an age is read off the curves at that age by linear
interpolation between neighbouring quantiles: a volume on the median curve is at the 50th
centile, one below the 3rd centile curve is reported as ``"<3"``, one above the 97th as
``">97"``. Nothing is extrapolated: at an age outside the range of the fit
(:attr:`Norms.age_range_weeks`), no centile is given, and the table says why (the curves'
quadratic terms dominate beyond the data, so an extrapolated centile could be anything).

**Not clinical norms.** Norms are only as good as the cohort they were fitted on. Every
norms file carries a :attr:`Norms.caveat` that ``neonb segment`` copies into its outputs;
norms fitted on neonb's synthetic cohort describe the phantom generator, not infants. Real
norms need large, representative cohorts of healthy infants with reference labels across the
whole age range, ideally separate for boys and girls, with scanner and site effects
considered (harmonised or modelled).

Example:
    >>> norms = fit_norms(volumes, source={"description": "demo cohort"})  # doctest: +SKIP
    >>> save_norms(norms, "models/demo")  # doctest: +SKIP
    >>> load_norms("models/demo").centile("WM", 40.0, 180.0)  # doctest: +SKIP
    Centile(centile=55.2, text='55.2', median_ml=176.1, note='')
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from neonb.errors import ConfigError, DataError
from neonb.files import atomic_write, read_json

__all__ = [
    "DEGREE",
    "MIN_SESSIONS",
    "NORMS_FILE",
    "QUANTILES",
    "Centile",
    "Norms",
    "caveat_text",
    "fit_norms",
    "load_norms",
    "plot_norms",
    "save_norms",
]

NORMS_FILE = "norms.json"
"""Name of the norms file in a model folder."""

FORMAT = "neonb-norms"
"""The ``format`` field of :data:`NORMS_FILE`."""

FORMAT_VERSION = 1
"""Version of the norms file layout; a loader refuses newer versions."""

QUANTILES: tuple[float, ...] = (0.03, 0.10, 0.25, 0.50, 0.75, 0.90, 0.97)
"""Quantiles fitted: the centiles of the usual growth charts (3rd, 10th, 25th, 50th, ...)."""

DEGREE = 2
"""Degree of the polynomial in scan age (a quadratic: see the module docstring)."""

MIN_SESSIONS = 20
"""Fewest sessions norms are fitted on: with fewer, the 3rd and 97th centile curves are
little more than the youngest and oldest points' extremes."""

MAX_NORMS_BYTES = 2**20
"""Largest :data:`NORMS_FILE` read (a fit of ten tissues takes a few kB)."""

REAL_NORMS_NEED = (
    "Real norms need large, representative cohorts of healthy infants with reference labels "
    "across the whole age range, ideally separate for girls and boys, with scanner and site "
    "effects considered (harmonised or modelled)."
)
"""What data real norms need (part of every caveat)."""

_VOLUME_COLUMNS = ("participant_id", "session_id", "scan_age", "tissue", "volume_ml")


def caveat_text(*, synthetic: bool, n_sessions: int) -> str:
    """The caveat every norms file carries, and ``neonb segment`` repeats.

    Args:
        synthetic: the norms were fitted on neonb's synthetic cohort.
        n_sessions: the number of sessions they were fitted on.
    """
    if synthetic:
        first = (
            f"These norms were fitted on {n_sessions} sessions of neonb's synthetic cohort: "
            "they describe the phantom generator, not infants, and are not clinical norms."
        )
    else:
        first = (
            f"These norms describe the {n_sessions} sessions of the model's training cohort "
            "only; they are not clinical norms."
        )
    return f"{first} {REAL_NORMS_NEED}"


class Centile(NamedTuple):
    """One volume against the norms at one age.

    Attributes:
        centile: the centile in [3, 97] (clipped to 3 or 97 beyond the outer curves), or NaN
            when none is given (age outside the norms' range, no norm for the tissue).
        text: ``"42.1"``, ``"<3"``, ``">97"`` or ``"n/a"``.
        median_ml: the norms' median volume at that age (mL), NaN when out of range.
        note: why no centile is given, or ``""``.
    """

    centile: float
    text: str
    median_ml: float
    note: str


@dataclass
class Norms:
    """Quantile-regression curves of tissue volume (mL) against scan age (weeks PMA).

    Attributes:
        quantiles: the quantiles fitted, increasing, in (0, 1).
        degree: degree of the polynomial in ``age - age_centre_weeks``.
        age_centre_weeks: the age the polynomial is centred on (the fit's mean age).
        age_range_weeks: ``(youngest, oldest)`` scan age of the fit; no centile outside it.
        coefficients: tissue abbreviation (e.g. ``"WM"``) -> ``(Q, degree + 1)``
            coefficients, constant term first, one row per quantile.
        n_sessions: sessions fitted on.
        n_participants: infants fitted on.
        source: where the volumes came from (description, data folder, sessions used).
        caveat: what these norms are not (:func:`caveat_text`).
        synthetic: fitted on neonb's synthetic cohort.
    """

    quantiles: tuple[float, ...]
    degree: int
    age_centre_weeks: float
    age_range_weeks: tuple[float, float]
    coefficients: dict[str, np.ndarray]
    n_sessions: int
    n_participants: int
    source: dict[str, Any] = field(default_factory=dict)
    caveat: str = ""
    synthetic: bool = False

    @property
    def tissues(self) -> list[str]:
        """Tissue abbreviations with norms, in the order fitted."""
        return list(self.coefficients)

    def in_range(self, age: float) -> bool:
        """Whether ``age`` (weeks) is inside the ages the norms were fitted on."""
        low, high = self.age_range_weeks
        return math.isfinite(age) and low <= age <= high

    def curves(self, tissue: str, ages: Sequence[float] | np.ndarray) -> np.ndarray:
        """The quantile curves of ``tissue`` at ``ages``, sorted at each age.

        Args:
            tissue: an abbreviation of :attr:`tissues`.
            ages: scan ages in weeks, shape ``(A,)``.

        Returns:
            Volumes in mL, shape ``(A, Q)``, non-decreasing along ``Q`` (monotone
            rearrangement of crossing curves).
        """
        x = np.asarray(ages, dtype=np.float64) - self.age_centre_weeks
        design = np.vander(x, self.degree + 1, increasing=True)  # (A, degree + 1)
        return np.sort(design @ self.coefficients[tissue].T, axis=1)

    def centile(self, tissue: str, age: float, volume_ml: float) -> Centile:
        """The centile of ``volume_ml`` of ``tissue`` at ``age`` weeks.

        Linear interpolation between the neighbouring quantile curves at that age; below
        the lowest curve ``"<3"``, above the highest ``">97"``. No extrapolation in age.
        """
        low, high = self.age_range_weeks
        if tissue not in self.coefficients:
            return Centile(math.nan, "n/a", math.nan, "no norm for this class")
        if not self.in_range(float(age)):
            note = f"outside the norms' age range ({low:.1f}-{high:.1f} weeks)"
            return Centile(math.nan, "n/a", math.nan, note)
        if not math.isfinite(volume_ml):
            return Centile(math.nan, "n/a", math.nan, "no volume")
        values = self.curves(tissue, [float(age)])[0]
        taus = 100 * np.asarray(self.quantiles)
        median = float(np.interp(50.0, taus, values))
        first, last = taus[0], taus[-1]
        if volume_ml < values[0]:
            return Centile(float(first), f"<{first:g}", median, "")
        if volume_ml > values[-1]:
            return Centile(float(last), f">{last:g}", median, "")
        centile = float(_interp_monotone(volume_ml, values, taus))
        return Centile(centile, f"{centile:.1f}", median, "")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of :data:`NORMS_FILE`."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": (
                "linear quantile regression (statsmodels QuantReg) of tissue volume (mL) on a "
                f"degree-{self.degree} polynomial in scan age (weeks PMA) minus "
                "age_centre_weeks; curves sorted at each age (monotone rearrangement); "
                "centiles interpolated linearly between curves, no extrapolation in age"
            ),
            "quantiles": list(self.quantiles),
            "degree": self.degree,
            "age_centre_weeks": self.age_centre_weeks,
            "age_range_weeks": list(self.age_range_weeks),
            "n_sessions": self.n_sessions,
            "n_participants": self.n_participants,
            "synthetic": self.synthetic,
            "source": self.source,
            "caveat": self.caveat,
            "tissues": {
                tissue: {"coefficients": coefficients.tolist()}
                for tissue, coefficients in self.coefficients.items()
            },
        }


def _interp_monotone(value: float, values: np.ndarray, taus: np.ndarray) -> float:
    """Centile of ``value`` between sorted curve values; ties (equal curves) share the mean."""
    if np.all(np.diff(values) > 0):
        return float(np.interp(value, values, taus))
    tied = taus[values == value]
    if tied.size:
        return float(tied.mean())
    return float(np.interp(value, values, taus))


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------


def fit_norms(
    volumes: pd.DataFrame,
    *,
    source: Mapping[str, Any] | None = None,
    synthetic: bool = False,
    quantiles: Sequence[float] = QUANTILES,
    degree: int = DEGREE,
    min_sessions: int | None = None,
    path: str | os.PathLike = "volumes",
) -> Norms:
    """Fit centile curves of each tissue's volume against scan age.

    Args:
        volumes: one row per session and tissue, as :func:`neonb.cohort.tissue_volumes`
            writes (chapter 00's ``tissue_volumes.tsv``): ``participant_id``,
            ``session_id``, ``scan_age`` (weeks PMA), ``tissue`` (abbreviation, e.g.
            ``"WM"``) and ``volume_ml``.
        source: where the volumes came from, recorded in the file.
        synthetic: the volumes come from neonb's synthetic cohort (sets the caveat).
        quantiles: quantiles to fit, in (0, 1), must include 0.5.
        degree: polynomial degree in age (1 to 3).
        min_sessions: fewest sessions (default :data:`MIN_SESSIONS`).
        path: the name of the table in error messages (e.g. the TSV it was read from).

    Returns:
        The fitted :class:`Norms`.

    Raises:
        DataError: naming ``path`` when columns are missing, a value is not a finite number
            (or a volume is negative), or there are fewer than ``min_sessions`` sessions
            with a scan age, or all at one age.
        ConfigError: for quantiles outside (0, 1) without 0.5, or a degree outside 1-3.
    """
    taus = tuple(float(q) for q in quantiles)
    if not taus or list(taus) != sorted(set(taus)) or not all(0 < q < 1 for q in taus):
        raise ConfigError(f"quantiles must increase strictly within (0, 1), got {list(taus)}")
    if 0.5 not in taus:
        raise ConfigError(f"quantiles must include the median 0.5, got {list(taus)}")
    if degree not in (1, 2, 3):
        raise ConfigError(f"degree must be 1, 2 or 3, got {degree!r}")
    min_sessions = MIN_SESSIONS if min_sessions is None else int(min_sessions)
    table = _check_volumes(volumes, path)
    sessions = table.drop_duplicates(["participant_id", "session_id"])
    n_sessions = len(sessions)
    if n_sessions < min_sessions:
        raise DataError(
            path,
            f"holds {n_sessions} sessions; fitting norms needs at least {min_sessions}",
        )
    ages = sessions["scan_age"].to_numpy(np.float64)
    if np.ptp(ages) <= 0:
        raise DataError(path, "every session has the same scan age: no curve against age")
    centre = float(ages.mean())
    coefficients = {
        tissue: _fit_tissue(group, centre, taus, degree)
        for tissue, group in table.groupby("tissue", sort=False)
    }
    return Norms(
        quantiles=taus,
        degree=degree,
        age_centre_weeks=round(centre, 6),
        age_range_weeks=(float(ages.min()), float(ages.max())),
        coefficients=coefficients,
        n_sessions=n_sessions,
        n_participants=int(sessions["participant_id"].nunique()),
        source=dict(source or {}),
        caveat=caveat_text(synthetic=synthetic, n_sessions=n_sessions),
        synthetic=synthetic,
    )


def _check_volumes(volumes: pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    missing = [c for c in _VOLUME_COLUMNS if c not in volumes]
    if missing:
        raise DataError(path, f"lacks the column(s) {missing}")
    table = volumes[list(_VOLUME_COLUMNS)].copy()
    for column in ("scan_age", "volume_ml"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(np.float64))
        if bad.any():
            row = table[bad].iloc[0]
            raise DataError(
                path,
                f"{column} {row[column]!r} of sub-{row['participant_id']} "
                f"ses-{row['session_id']} is not a finite number",
            )
        table[column] = values.astype(np.float64)
    if (table["volume_ml"] < 0).any():
        raise DataError(path, "holds a negative volume")
    table["tissue"] = table["tissue"].astype(str)
    table["participant_id"] = table["participant_id"].astype(str)
    table["session_id"] = table["session_id"].astype(str)
    return table


def _fit_tissue(
    group: pd.DataFrame, centre: float, taus: Sequence[float], degree: int
) -> np.ndarray:
    """``(Q, degree + 1)`` QuantReg coefficients of one tissue's volume on age."""
    from statsmodels.regression.quantile_regression import QuantReg
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, IterationLimitWarning

    x = group["scan_age"].to_numpy(np.float64) - centre
    y = group["volume_ml"].to_numpy(np.float64)
    design = np.vander(x, degree + 1, increasing=True)
    rows = []
    with warnings.catch_warnings():
        # statsmodels warns when its iterative solver stops at max_iter with a tiny change
        # left, or on a degenerate design at an outer quantile; the coefficients are usable.
        warnings.simplefilter("ignore", IterationLimitWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        for tau in taus:
            params = QuantReg(y, design).fit(q=tau, max_iter=5000).params
            rows.append(np.asarray(params, dtype=np.float64))
    return np.vstack(rows)


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


def save_norms(norms: Norms, model_dir: str | os.PathLike) -> Path:
    """Write ``norms`` as ``model_dir/norms.json`` (atomically); returns the path."""
    path = Path(model_dir) / NORMS_FILE
    text = json.dumps(norms.to_dict(), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def load_norms(model_dir: str | os.PathLike) -> Norms | None:
    """The norms of a model folder, or ``None`` when it has no :data:`NORMS_FILE`.

    Raises:
        DataError: naming the file when it is unreadable, not neonb norms, of a newer
            format, or holds a field of the wrong type or size.
    """
    path = Path(model_dir) / NORMS_FILE
    if not path.is_file():
        return None
    return _norms_from_dict(read_json(path, MAX_NORMS_BYTES), path)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _norms_from_dict(data: Any, path: Path) -> Norms:
    def bad(name: str, expected: str) -> DataError:
        return DataError(path, f"field {name!r} must be {expected}")

    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise DataError(path, f"is not a neonb norms file (format {FORMAT!r})")
    version = data.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise bad("format_version", "a positive integer")
    if version > FORMAT_VERSION:
        raise DataError(
            path, f"format_version {version} is newer than this neonb reads", hint="upgrade neonb"
        )
    taus = data.get("quantiles")
    if not (
        isinstance(taus, list)
        and 0 < len(taus) <= 99
        and all(_number(q) and 0 < q < 1 for q in taus)
        and taus == sorted(set(taus))
    ):
        raise bad("quantiles", "increasing numbers in (0, 1)")
    degree = data.get("degree")
    if degree not in (1, 2, 3):
        raise bad("degree", "1, 2 or 3")
    centre = data.get("age_centre_weeks")
    age_range = data.get("age_range_weeks")
    if not _number(centre):
        raise bad("age_centre_weeks", "a number of weeks")
    if not (
        isinstance(age_range, list)
        and len(age_range) == 2
        and all(_number(a) for a in age_range)
        and age_range[0] <= age_range[1]
    ):
        raise bad("age_range_weeks", "[youngest, oldest] in weeks")
    tissues = data.get("tissues")
    if not isinstance(tissues, Mapping) or not tissues or len(tissues) > 256:
        raise bad("tissues", "an object of tissues")
    coefficients = {}
    for tissue, entry in tissues.items():
        rows = entry.get("coefficients") if isinstance(entry, Mapping) else None
        array = np.asarray(rows, dtype=object) if isinstance(rows, list) else None
        if (
            array is None
            or array.shape != (len(taus), degree + 1)
            or not all(_number(v) for v in array.ravel())
        ):
            raise bad(
                f"tissues.{tissue}.coefficients",
                f"{len(taus)} rows of {degree + 1} finite numbers",
            )
        coefficients[str(tissue)] = array.astype(np.float64)
    counts = {key: data.get(key) for key in ("n_sessions", "n_participants")}
    for key, value in counts.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise bad(key, "a whole number")
    source = data.get("source", {})
    return Norms(
        quantiles=tuple(float(q) for q in taus),
        degree=int(degree),
        age_centre_weeks=float(centre),
        age_range_weeks=(float(age_range[0]), float(age_range[1])),
        coefficients=coefficients,
        n_sessions=counts["n_sessions"],
        n_participants=counts["n_participants"],
        source=dict(source) if isinstance(source, Mapping) else {},
        caveat=str(data.get("caveat") or caveat_text(synthetic=False, n_sessions=0)),
        synthetic=bool(data.get("synthetic", False)),
    )


# --------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------

PLOT_DPI = 100
"""Resolution of the norms picture (4 x 2 panels, about 10 x 5.5 inches)."""


def plot_norms(
    norms: Norms,
    volumes: pd.DataFrame,
    age: float,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> None:
    """Save one panel per tissue: the norms' centile curves and the infant's volume.

    The curves span the norms' age range (the 3rd-97th, 10th-90th and 25th-75th bands,
    shaded, and the median); the infant's volume is a dot at its scan age, titled with its
    centile. The caveat is printed under the panels.

    Args:
        norms: the model's norms.
        volumes: the session's volume table (``abbreviation``, ``volume_ml``, and
            ``centile`` when computed).
        age: the infant's scan age in weeks PMA.
        path: where to write the PNG.
        title: the figure's title (e.g. the session's name).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [row for _, row in volumes.iterrows() if row["abbreviation"] in norms.coefficients]
    n_cols = 4
    n_rows = max(1, math.ceil(len(rows) / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(10, 2.5 * n_rows + 0.9), squeeze=False)
    low, high = norms.age_range_weeks
    ages = np.linspace(low, high, 60)
    taus = list(norms.quantiles)
    for ax, row in zip(axes.ravel(), rows, strict=False):
        tissue = str(row["abbreviation"])
        curves = norms.curves(tissue, ages)
        for i in range(len(taus) // 2):
            ax.fill_between(ages, curves[:, i], curves[:, -1 - i], color="#4c72b0", alpha=0.15)
        median = [np.interp(0.5, taus, c) for c in curves]
        ax.plot(ages, median, color="#4c72b0", lw=1.2)
        volume = float(row["volume_ml"])
        ax.plot([age], [volume], "o", color="#c44e52", ms=6, zorder=3)
        text = str(row.get("centile", "n/a"))
        label = f"centile {text}" if text not in ("n/a", "nan", "") else "no centile"
        ax.set_title(f"{tissue}: {label}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("scan age (weeks PMA)", fontsize=7)
        ax.set_ylabel("mL", fontsize=7)
    for ax in axes.ravel()[len(rows) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, _wrap(norms.caveat, 150), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.09, 1, 0.96))
    try:
        fig.savefig(str(path), dpi=PLOT_DPI, format="png")
    finally:
        plt.close(fig)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
