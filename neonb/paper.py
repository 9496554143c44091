"""The numbers Richter & Fetit (2022) report, as data, to print beside neonb's own.

Everything here is transcribed from the paper (Front. Neuroinform. 16:1006532,
doi:10.3389/fninf.2022.1006532); nothing is computed. The notebooks and the book put
these tables next to the ones neonb computes, which always say on what data and
hardware they were obtained. The paper's experiments ran on the dHCP third release on
NVIDIA Tesla T4 GPUs.

Table columns use the short tissue names of :mod:`neonb.labels`.
"""

from __future__ import annotations

import pandas as pd

CITATION = (
    "Richter L, Fetit AE (2022). Accurate segmentation of neonatal brain MRI with deep "
    "learning. Front. Neuroinform. 16:1006532. doi:10.3389/fninf.2022.1006532"
)
HARDWARE = "NVIDIA Tesla T4 (16 GB)"
DATA = "dHCP third release, 709 complete sessions"

TISSUES = ["CSF", "cGM", "WM", "Ventr.", "Cereb.", "dGM", "BS", "Hippoc."]

COHORT = {
    "sessions": 709,
    "youngest (w)": 26.71,
    "oldest (w)": 45.14,
    "median (w)": 40.57,
    "mean (w)": 39.56,
    "preterm-born": 148,
    "preterm-born (%)": 100 * 148 / 709,
}
"""§3.1: the 709 complete dHCP sessions; 148 infants born before 37 weeks.

The paper calls its data units "subjects" and states neither how many infants they are
nor how many were scanned twice; :func:`neonb.cohort.compare_with_paper` leaves those
blank. Scan ages are post-menstrual ages in weeks (``(w)``)."""


def table1() -> pd.DataFrame:
    """Table 1: mean Dice (± std over 4 runs), validation and test, with and without BG."""
    return pd.DataFrame(
        {
            "mean": [0.934, 0.943, 0.913, 0.917],
            "std": [4e-4, 4e-4, 3e-3, 3e-3],
        },
        index=pd.MultiIndex.from_product(
            [["validation", "test"], ["Mean DSC", "Mean DSC (no BG)"]], names=["set", "metric"]
        ),
    )


def table2() -> pd.DataFrame:
    """Table 2: Dice per tissue (mean over 4 runs), validation and test."""
    return pd.DataFrame(
        [
            [0.925, 0.943, 0.961, 0.907, 0.950, 0.960, 0.961, 0.903],
            [0.919, 0.926, 0.932, 0.903, 0.895, 0.940, 0.940, 0.877],
        ],
        index=pd.Index(["validation", "test"], name="set"),
        columns=TISSUES,
    )


AGEUNET = {
    "test Dice (no BG)": 0.866,
    "final training MSE (w²)": 2.45,
    "final training RMSE (w)": 1.57,
    "learning rate": 1e-3,
    "alpha": 1e-2,
}
"""§4.1.2: AgeU-Net, 2 runs of 60 epochs; the age head learned the mean age on the test set.

The paper's "MSE loss ... of 2.45, corresponding to an average deviation of 1.57 weeks" is
the root of the mean squared error (√2.45 = 1.565), an RMSE, not a mean absolute error; the
paper reports no training MAE. It writes both α and the learning rate as "10e-3": α is
1e-2, the value of ``10e-3`` in the authors' public code (``age_loss_weight`` in
``Pipeline/Hyperparams.py``); the learning rate is read as 1e-3, because the paper calls it a
"medium" rate, below the baseline's 1e-2 at which the age loss diverged (the authors' code
holds no separate AgeU-Net learning rate)."""


def table3() -> pd.DataFrame:
    """Table 3: mean Dice of the label-budgeting conditions (20 epochs each)."""
    return pd.DataFrame(
        [
            [0.913, 0.913, 0.910, 0.914],
            [0.912, 0.912, 0.900, 0.907],
            [0.911, 0.910, 0.913, 0.917],
            [0.913, 0.912, 0.905, 0.908],
            [0.908, 0.909, 0.852, 0.849],
        ],
        index=pd.Index(["random", "sagittal", "coronal", "axial", "full"], name="condition"),
        columns=pd.MultiIndex.from_product(
            [["validation", "test"], ["Mean DSC", "Mean DSC (no BG)"]], names=["set", "metric"]
        ),
    )


def table4() -> pd.DataFrame:
    """Table 4: Dice per tissue of the six transfer strategies on the preterm test set."""
    return pd.DataFrame(
        [
            [0.778, 0.723, 0.712, 0.744, 0.010, 0.327, 0.765, 0.549],
            [0.780, 0.712, 0.617, 0.733, 0.012, 0.361, 0.758, 0.553],
            [0.791, 0.718, 0.604, 0.693, 0.065, 0.604, 0.781, 0.632],
            [0.808, 0.757, 0.446, 0.689, 0.201, 0.801, 0.794, 0.680],
            [0.811, 0.816, 0.464, 0.598, 0.185, 0.818, 0.800, 0.650],
            [0.791, 0.689, 0.201, 0.671, 0.463, 0.739, 0.700, 0.339],
        ],
        index=pd.Index(["none", "shallow", "medium", "deep", "full", "scratch"], name="strategy"),
        columns=TISSUES,
    )


_PAIRS = ["shallow", "medium", "deep", "full", "scratch"]


def _upper_triangle(rows: list[list[float | None]]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=_PAIRS, columns=_PAIRS, dtype=float)


def table5() -> pd.DataFrame:
    """Table 5: Bonferroni-corrected p of pairwise t-tests, mean Dice without background."""
    n = None
    return _upper_triangle(
        [
            [n, 1.67e-7, 2.56e-4, 4.40e-3, 2.23e-1],
            [n, n, 2.26e-1, 5.67e-1, 1.30e-2],
            [n, n, n, 1.0, 7.29e-3],
            [n, n, n, n, 8.84e-3],
            [n, n, n, n, n],
        ]
    )


def table6() -> pd.DataFrame:
    """Table 6: Bonferroni-corrected p of pairwise t-tests, mean Dice over all classes."""
    n = None
    return _upper_triangle(
        [
            [n, 1.04e-7, 1.06e-6, 4.75e-4, 1.0],
            [n, n, 1.27e-4, 5.26e-2, 5.21e-1],
            [n, n, n, 1.0, 3.33e-2],
            [n, n, n, n, 6.76e-2],
            [n, n, n, n, n],
        ]
    )
