"""Pairwise comparisons of groups of per-subject scores, as in the paper's Tables 5 and 6.

Richter & Fetit (2022, §4.3) compare the transfer-learning strategies pair by pair with
two-sided independent *t*-tests on the per-subject mean Dice and correct the *p*-values
for the number of pairs with Bonferroni's method (overall α = 0.05). Nothing is computed
by hand here: the tests are :func:`scipy.stats.ttest_ind` (Student's test, equal
variances, unless ``equal_var=False`` asks for Welch's) and the correction is
:func:`statsmodels.stats.multitest.multipletests`.

:func:`pairwise_ttests` returns one tidy row per pair; :func:`upper_triangle` lays one of
its columns out as the paper prints it, groups as rows and columns with the upper
triangle filled.

Example:
    >>> tests = pairwise_ttests(cases, "dice_mean_nobg", by="strategy",
    ...                         order=["shallow", "medium", "deep", "full", "scratch"])
    >>> upper_triangle(tests, "p_corrected")      # the layout of the paper's Table 5
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from neonb.errors import ConfigError

__all__ = ["TEST_COLUMNS", "pairwise_ttests", "upper_triangle"]

TEST_COLUMNS: list[str] = [
    "group_a",
    "group_b",
    "n_a",
    "n_b",
    "mean_a",
    "mean_b",
    "t",
    "p",
    "p_corrected",
    "reject",
]
"""Columns of :func:`pairwise_ttests`."""


def _groups(
    table: pd.DataFrame, value: str, by: str, order: Sequence[str] | None
) -> dict[str, np.ndarray]:
    for column in (value, by):
        if column not in table.columns:
            raise ConfigError(f"the table has no column {column!r}; it has {list(table.columns)}")
    present = list(dict.fromkeys(table[by]))
    order = present if order is None else list(order)
    missing = [g for g in order if g not in present]
    if missing:
        raise ConfigError(f"no rows with {by} in {missing}; present: {present}")
    groups = {}
    for group in order:
        values = table.loc[table[by] == group, value].dropna().to_numpy(dtype=float)
        if len(values) < 2:
            raise ConfigError(
                f"a t-test needs at least 2 values per group, but {by}={group!r} has {len(values)}"
            )
        groups[group] = values
    if len(groups) < 2:
        raise ConfigError(f"need at least two groups to compare, got {list(groups)}")
    return groups


def pairwise_ttests(
    table: pd.DataFrame,
    value: str,
    *,
    by: str = "strategy",
    order: Sequence[str] | None = None,
    alpha: float = 0.05,
    method: str = "bonferroni",
    equal_var: bool = True,
) -> pd.DataFrame:
    """Two-sided independent t-tests between every pair of groups, corrected for multiplicity.

    Args:
        table: one row per subject and group, e.g. :func:`neonb.metrics.case_summary`
            rows with a ``strategy`` column.
        value: the column compared (e.g. ``"dice_mean_nobg"``); ``NaN`` values are dropped.
        by: the column naming the group.
        order: the groups to compare, in this order (default: every group, in order of
            first appearance). Pairs are ``(order[i], order[j])`` for ``i < j``.
        alpha: family-wise error rate for ``reject``.
        method: any method of :func:`statsmodels.stats.multitest.multipletests`
            (``"bonferroni"``, as in the paper; ``"holm"``, ...).
        equal_var: Student's t-test (``True``, scipy's default) or Welch's (``False``).

    Returns:
        One row per pair with :data:`TEST_COLUMNS`: group names and sizes, group means,
        the t statistic (positive when ``group_a`` has the larger mean), the uncorrected
        two-sided p, the corrected p (Bonferroni: ``min(1, m p)`` for ``m`` pairs) and
        whether the null hypothesis is rejected at ``alpha``.

    Raises:
        ConfigError: for a missing column or group, a group with fewer than two values,
            or fewer than two groups.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    groups = _groups(table, value, by, order)
    rows = []
    for a, b in combinations(groups, 2):
        result = stats.ttest_ind(groups[a], groups[b], equal_var=equal_var)
        rows.append(
            {
                "group_a": a,
                "group_b": b,
                "n_a": len(groups[a]),
                "n_b": len(groups[b]),
                "mean_a": float(groups[a].mean()),
                "mean_b": float(groups[b].mean()),
                "t": float(result.statistic),
                "p": float(result.pvalue),
            }
        )
    tests = pd.DataFrame(rows)
    reject, corrected, _, _ = multipletests(tests["p"].to_numpy(), alpha=alpha, method=method)
    tests["p_corrected"] = corrected
    tests["reject"] = reject
    return tests[TEST_COLUMNS]


def upper_triangle(
    tests: pd.DataFrame, value: str = "p_corrected", order: Sequence[str] | None = None
) -> pd.DataFrame:
    """One column of :func:`pairwise_ttests` as a square table, upper triangle filled.

    Args:
        tests: rows of :func:`pairwise_ttests`.
        value: the column to lay out.
        order: the row and column order (default: the groups in order of appearance).

    Returns:
        Groups as index and columns; cell ``(a, b)`` holds the value of pair ``(a, b)``
        above the diagonal, ``NaN`` on and below it (the paper's ``*``).
    """
    if value not in tests.columns:
        raise ConfigError(f"the tests have no column {value!r}; they have {list(tests.columns)}")
    names = list(dict.fromkeys([*tests["group_a"], *tests["group_b"]]))
    order = names if order is None else list(order)
    position = {name: i for i, name in enumerate(order)}
    square = pd.DataFrame(np.nan, index=order, columns=order, dtype=float)
    for row in tests.itertuples(index=False):
        a, b = row.group_a, row.group_b
        if a not in position or b not in position:
            continue
        if position[a] > position[b]:
            a, b = b, a
        square.loc[a, b] = float(getattr(row, value))
    return square
