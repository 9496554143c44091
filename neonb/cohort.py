"""What a cohort holds: its ages, preterm and term births, rescans, and tissue volumes.

The data chapter describes the cohort it reads (a dHCP release or neonb's synthetic one)
beside the facts the paper gives of the 709 complete dHCP sessions it used
(:data:`neonb.paper.COHORT`, §3.1). Every function here reads the *complete* sessions of a
manifest (:func:`neonb.data.read_manifest`, column ``complete``), the paper's data units.

=============================  =========================================================
function                       what it returns
=============================  =========================================================
:func:`cohort_facts`           sessions, participants, rescans, ages, preterm-born counts
:func:`compare_with_paper`     those facts beside the paper's (NaN where it states none)
:func:`age_ranges`             scan ages of preterm-born, term-born and unknown births
:func:`tissue_volumes`         one row per session and tissue: volume in mL
=============================  =========================================================

Example:
    >>> manifest = pd.DataFrame({"participant_id": ["a", "a", "b"], "session_id": ["1", "2", "1"],
    ...     "scan_age": [32.0, 40.0, 41.0], "preterm": [True, True, False], "complete": True})
    >>> facts = cohort_facts(manifest)
    >>> facts["sessions"], facts["participants"], facts["rescanned infants"]
    (3, 2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from neonb import paper
from neonb.errors import ConfigError
from neonb.labels import TISSUE_LABELS, short_names

__all__ = [
    "COHORT_FACTS",
    "age_ranges",
    "cohort_facts",
    "compare_with_paper",
    "complete_sessions",
    "tissue_volumes",
]

COHORT_FACTS = (
    "sessions",
    "participants",
    "rescanned infants",
    "youngest (w)",
    "oldest (w)",
    "median (w)",
    "mean (w)",
    "preterm-born",
    "term-born",
    "birth age unknown",
    "preterm-born (%)",
)
"""The rows of :func:`compare_with_paper`, in order (``(w)``: scan age in weeks PMA)."""

BIRTH_GROUPS = ("preterm-born", "term-born", "birth age unknown")
"""The groups of :func:`age_ranges` (preterm: born before 37 weeks, :mod:`neonb.data`)."""

_COLUMNS = ("participant_id", "session_id", "scan_age", "preterm", "complete")


def complete_sessions(manifest: pd.DataFrame) -> pd.DataFrame:
    """The complete sessions of a manifest (rows whose ``complete`` is true).

    Raises:
        ConfigError: naming the manifest columns that are missing.
    """
    missing = [c for c in _COLUMNS if c not in manifest]
    if missing:
        raise ConfigError(f"the manifest lacks the column(s) {missing}; read it with neonb.data")
    return manifest[manifest["complete"].astype(bool)]


def _birth_group(sessions: pd.DataFrame) -> pd.Series:
    preterm = sessions["preterm"].astype("boolean")
    group = np.where(preterm.fillna(False), BIRTH_GROUPS[0], BIRTH_GROUPS[1])
    return pd.Series(group, index=sessions.index).where(preterm.notna(), BIRTH_GROUPS[2])


def cohort_facts(manifest: pd.DataFrame) -> dict[str, float]:
    """The facts of :data:`COHORT_FACTS` for the complete sessions of ``manifest``.

    ``rescanned infants`` counts participants with more than one complete session;
    ``preterm-born (%)`` is the share of sessions whose infant was born preterm, over all
    complete sessions (as the paper's 148 of 709). Ages are NaN for an empty cohort.
    """
    sessions = complete_sessions(manifest)
    ages = sessions["scan_age"].astype("float64")
    per_participant = sessions.groupby("participant_id").size()
    groups = _birth_group(sessions).value_counts()
    n = len(sessions)
    facts: dict[str, float] = {
        "sessions": n,
        "participants": int(per_participant.size),
        "rescanned infants": int((per_participant > 1).sum()),
        "youngest (w)": float(ages.min()) if n else math.nan,
        "oldest (w)": float(ages.max()) if n else math.nan,
        "median (w)": float(ages.median()) if n else math.nan,
        "mean (w)": float(ages.mean()) if n else math.nan,
        **{group: int(groups.get(group, 0)) for group in BIRTH_GROUPS},
    }
    facts["preterm-born (%)"] = 100 * facts["preterm-born"] / n if n else math.nan
    return facts


def compare_with_paper(manifest: pd.DataFrame, label: str = "this cohort") -> pd.DataFrame:
    """:func:`cohort_facts` beside the paper's (:data:`neonb.paper.COHORT`).

    Args:
        manifest: the cohort's manifest.
        label: the name of this cohort's column.

    Returns:
        One row per fact of :data:`COHORT_FACTS` (index ``fact``), columns
        ``paper (dHCP, n=709)`` (NaN where the paper states nothing: it counts sessions, as
        "subjects", not infants) and ``label``.
    """
    ours = cohort_facts(manifest)
    return pd.DataFrame(
        {
            f"paper (dHCP, n={paper.COHORT['sessions']})": [
                paper.COHORT.get(f, math.nan) for f in COHORT_FACTS
            ],
            label: [ours[f] for f in COHORT_FACTS],
        },
        index=pd.Index(COHORT_FACTS, name="fact"),
    )


def age_ranges(manifest: pd.DataFrame) -> pd.DataFrame:
    """Scan ages of the complete sessions by birth: preterm-born, term-born, unknown.

    Returns:
        One row per group of :data:`BIRTH_GROUPS` that has sessions (index ``birth``), with
        ``sessions``, ``participants``, ``youngest (w)``, ``median (w)`` and ``oldest (w)``.
    """
    sessions = complete_sessions(manifest)
    grouped = sessions.assign(birth=_birth_group(sessions)).groupby("birth")
    table = pd.DataFrame(
        {
            "sessions": grouped.size(),
            "participants": grouped["participant_id"].nunique(),
            "youngest (w)": grouped["scan_age"].min().astype(float),
            "median (w)": grouped["scan_age"].median().astype(float),
            "oldest (w)": grouped["scan_age"].max().astype(float),
        }
    )
    return table.reindex([g for g in BIRTH_GROUPS if g in table.index]).rename_axis("birth")


def tissue_volumes(manifest: pd.DataFrame, labels: Sequence[int] = TISSUE_LABELS) -> pd.DataFrame:
    """Volume of every tissue of every complete session, from its ``drawem9`` label image.

    A volume is the voxel count times the voxel volume (:func:`neonb.metrics.volumes_ml`).

    Args:
        manifest: the cohort's manifest (column ``dseg``: the label image of each session).
        labels: the label values to report (default: the eight tissues).

    Returns:
        One row per session and tissue: ``participant_id``, ``session_id``, ``scan_age``,
        ``preterm``, ``tissue`` (short name, :func:`neonb.labels.short_names`) and
        ``volume_ml``.

    Raises:
        DataError: naming a label image that cannot be read (:func:`neonb.data.load_nifti`).
    """
    from neonb.data import load_nifti
    from neonb.metrics import volumes_ml

    labels = tuple(int(v) for v in labels)
    names = short_names(labels)
    rows = []
    for _, row in complete_sessions(manifest).iterrows():
        image = load_nifti(row["dseg"])
        volumes = volumes_ml(np.asarray(image.dataobj), image.header.get_zooms()[:3])
        ids = {key: row[key] for key in ("participant_id", "session_id", "scan_age", "preterm")}
        rows += [
            {**ids, "tissue": name, "volume_ml": float(volumes[value])}
            for name, value in zip(names, labels, strict=True)
        ]
    columns = ["participant_id", "session_id", "scan_age", "preterm", "tissue", "volume_ml"]
    return pd.DataFrame(rows, columns=columns)
