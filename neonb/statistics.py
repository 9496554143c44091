"""Comparisons of per-subject scores: the paper's tests, replicates, intervals and verdicts.

Richter & Fetit (2022, §4.3) compare the transfer-learning strategies pair by pair with
two-sided independent *t*-tests on the per-subject mean Dice and correct the *p*-values
for the number of pairs with Bonferroni's method (overall α = 0.05). Nothing is computed
by hand here: the tests are :func:`scipy.stats.ttest_ind` (Student's test, equal
variances, unless ``equal_var=False`` asks for Welch's) and the correction is
:func:`statsmodels.stats.multitest.multipletests`.

:func:`pairwise_ttests` returns one tidy row per pair; :func:`upper_triangle` lays one of
its columns out as the paper prints it, groups as rows and columns with the upper
triangle filled.

Every strategy (or condition) is scored on the **same** test subjects, so neonb adds the
paired test beside the paper's independent one (:func:`pairwise_paired_tests`,
:func:`scipy.stats.ttest_rel`). With several seeded runs per strategy, a subject's score is
first averaged over the runs (:func:`average_runs`), so the unit of every test stays the
test subject, as in the paper, and :func:`replicate_summary` gives a 95 % interval over
runs and one over subjects.

A finding is decided by :func:`check_claims`, with one stated rule per kind of claim
(:data:`RULES`): a difference in means by the paired t-test, an equivalence by two one-sided
tests (TOST, :func:`statsmodels.stats.weightstats.ttost_paired`) against a stated margin,
a difference in spread by the Pitman-Morgan test for paired variances; the p-values of a
family of claims are Bonferroni-corrected together. The verdict is one of :data:`VERDICTS`.

Example:
    >>> tests = pairwise_ttests(cases, "dice_mean_nobg", by="strategy",
    ...                         order=["shallow", "medium", "deep", "full", "scratch"])
    >>> upper_triangle(tests, "p_corrected")      # the layout of the paper's Table 5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from neonb.errors import ConfigError

__all__ = [
    "HOLDS",
    "NOT_CONTRADICTED",
    "NOT_SUPPORTED",
    "CONTRADICTED",
    "RULES",
    "TEST_COLUMNS",
    "VERDICTS",
    "Claim",
    "average_runs",
    "check_claims",
    "mean_interval",
    "pairwise_paired_tests",
    "pairwise_ttests",
    "replicate_summary",
    "upper_triangle",
]

HOLDS, NOT_CONTRADICTED, NOT_SUPPORTED, CONTRADICTED = (
    "holds",
    "not contradicted",
    "not supported",
    "contradicted",
)
VERDICTS: tuple[str, ...] = (HOLDS, NOT_CONTRADICTED, NOT_SUPPORTED, CONTRADICTED)
"""What :func:`check_claims` says of a claim, from strongest support to strongest refutation."""

RULES: dict[str, str] = {
    "greater": (
        "paired t-test (scipy.stats.ttest_rel, two-sided) on the per-subject scores averaged "
        "over runs, Bonferroni-corrected over the claims of the table: holds if A > B with "
        "corrected p < alpha; contradicted if A < B with corrected p < alpha; otherwise not "
        "contradicted (A > B, not significant) or not supported (A <= B, not significant)"
    ),
    "equivalent": (
        "two one-sided paired t-tests (TOST, statsmodels ttost_paired) that A - B lies within "
        "+-margin, Bonferroni-corrected: holds if corrected p < alpha; contradicted if the "
        "paired t-test finds a difference (corrected p < alpha) and TOST does not find "
        "equivalence; otherwise not contradicted (no difference found, equivalence not shown)"
    ),
    "less_spread": (
        "Pitman-Morgan test for paired variances (Pearson r of A + B and A - B, "
        "scipy.stats.pearsonr), Bonferroni-corrected: holds if SD(A) < SD(B) with corrected "
        "p < alpha; contradicted if SD(A) > SD(B) with corrected p < alpha; otherwise not "
        "contradicted (SD(A) < SD(B), not significant) or not supported"
    ),
}
"""The rule that decides each kind of :class:`Claim`, as shown beside the verdicts."""

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


# --------------------------------------------------------------------------- replicates


def _check_columns(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"the table has no column {missing}; it has {list(table.columns)}")


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval of ``values`` (``NaN`` values dropped).

    Args:
        values: independent observations (one per run, or one per subject).
        confidence: the interval's coverage.

    Returns:
        ``(mean, low, high)``; the bounds are ``NaN`` for fewer than two values, and equal
        the mean when every value is the same.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    sem = float(stats.sem(x))
    if sem == 0.0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(x) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def average_runs(
    table: pd.DataFrame,
    value: str | Sequence[str],
    *,
    by: str = "strategy",
    subject: str = "participant_id",
    keep: Sequence[str] = (),
) -> pd.DataFrame:
    """Each subject's score averaged over the runs of its group: the unit of every test.

    Args:
        table: one row per run, group and subject (e.g. :func:`neonb.metrics.case_summary`
            rows with ``run`` and ``strategy``).
        value: the score column, or several.
        by: the group column.
        subject: the column identifying a test subject.
        keep: more columns that are constant per subject (``session_id``, ``scan_age``).

    Returns:
        One row per group and subject: ``by``, ``subject``, ``keep``, the ``value`` columns
        (means over runs) and ``n_runs``, in order of first appearance.
    """
    values = [value] if isinstance(value, str) else list(value)
    keys = [by, subject, *keep]
    _check_columns(table, [*values, *keys])
    grouped = table.groupby(keys, sort=False)
    averaged = grouped[values].mean()
    averaged["n_runs"] = grouped.size()
    return averaged.reset_index()


def replicate_summary(
    table: pd.DataFrame,
    value: str,
    *,
    by: str = "strategy",
    run: str = "run",
    subject: str = "participant_id",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean of each group with a confidence interval over runs and one over test subjects.

    The interval over runs treats each run's mean over the test subjects as one observation
    (how much a new training run would move the result); the interval over subjects treats
    each subject's score, averaged over runs, as one (how much new test subjects would).

    Args:
        table: one row per run, group and subject.
        value: the score column.
        by: the group column.
        run: the column numbering a group's runs.
        subject: the column identifying a test subject.
        confidence: coverage of both intervals.

    Returns:
        One row per group (order of first appearance): ``by``, ``n_runs``, ``n_subjects``,
        ``mean``, ``run_low``, ``run_high``, ``subject_low``, ``subject_high``. An interval
        needs two runs (or subjects); with one its bounds are ``NaN``.
    """
    _check_columns(table, [value, by, run, subject])
    rows = []
    for group, part in table.groupby(by, sort=False):
        per_run = part.groupby(run)[value].mean()
        per_subject = part.groupby(subject, sort=False)[value].mean()
        mean, run_low, run_high = mean_interval(per_run, confidence)
        _, subject_low, subject_high = mean_interval(per_subject, confidence)
        rows.append(
            {
                by: group,
                "n_runs": len(per_run),
                "n_subjects": len(per_subject),
                "mean": mean,
                "run_low": run_low,
                "run_high": run_high,
                "subject_low": subject_low,
                "subject_high": subject_high,
            }
        )
    return pd.DataFrame(rows)


def _paired(
    table: pd.DataFrame, value: str, by: str, subject: str, order: Sequence[str] | None
) -> pd.DataFrame:
    """Subjects as rows, groups as columns; each subject's score averaged over runs."""
    _check_columns(table, [value, by, subject])
    wide = average_runs(table, value, by=by, subject=subject).pivot(
        index=subject, columns=by, values=value
    )
    present = list(dict.fromkeys(table[by]))
    order = present if order is None else list(order)
    missing = [g for g in order if g not in present]
    if missing:
        raise ConfigError(f"no rows with {by} in {missing}; present: {present}")
    wide = wide[order]
    unpaired = wide.index[wide.isna().any(axis=1)]
    if len(unpaired):
        raise ConfigError(
            f"a paired test needs every {by} scored on the same subjects, but "
            f"{', '.join(map(str, unpaired[:5]))} lack a {value} for some {by}"
        )
    if len(wide) < 2:
        raise ConfigError(f"a paired test needs at least 2 subjects, but found {len(wide)}")
    return wide


def _varies(values: np.ndarray) -> bool:
    """Whether values differ by more than float rounding (a t-test of constants is undefined)."""
    return bool(np.ptp(values) > 1e-9 * max(1.0, float(np.abs(values).max())))


def _paired_t(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Statistic and two-sided p of the paired t-test of ``x`` and ``y``.

    When every subject moved alike (differences equal up to rounding) the test is undefined
    and the answer certain: p = 1 (t NaN) for no difference at all, p = 0 (t infinite, with
    the difference's sign) for a constant one.
    """
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if not _varies(d):
        if abs(d.mean()) < 1e-12:
            return float("nan"), 1.0
        return math.copysign(math.inf, d.mean()), 0.0
    result = stats.ttest_rel(x, y)
    return float(result.statistic), float(result.pvalue)


def pairwise_paired_tests(
    table: pd.DataFrame,
    value: str,
    *,
    by: str = "strategy",
    order: Sequence[str] | None = None,
    subject: str = "participant_id",
    alpha: float = 0.05,
    method: str = "bonferroni",
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Two-sided paired t-tests between every pair of groups, corrected for multiplicity.

    Every group must be scored on the same subjects; a subject's score is averaged over the
    runs of its group first (:func:`average_runs`).

    Args:
        table: one row per (run,) group and subject.
        value, by, order, alpha, method: as :func:`pairwise_ttests`.
        subject: the column identifying a test subject.
        confidence: coverage of the interval of the mean difference.

    Returns:
        One row per pair with :data:`TEST_COLUMNS` (``n_a == n_b``, the subjects), plus
        ``difference`` (mean of ``a - b``) and its interval ``difference_low``,
        ``difference_high``.

    Raises:
        ConfigError: for a missing column or group, subjects not scored in every group,
            or fewer than two subjects.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    wide = _paired(table, value, by, subject, order)
    rows = []
    for a, b in combinations(wide.columns, 2):
        t, p = _paired_t(wide[a].to_numpy(), wide[b].to_numpy())
        difference, low, high = mean_interval(wide[a] - wide[b], confidence)
        rows.append(
            {
                "group_a": a,
                "group_b": b,
                "n_a": len(wide),
                "n_b": len(wide),
                "mean_a": float(wide[a].mean()),
                "mean_b": float(wide[b].mean()),
                "t": t,
                "p": p,
                "difference": difference,
                "difference_low": low,
                "difference_high": high,
            }
        )
    tests = pd.DataFrame(rows)
    reject, corrected, _, _ = multipletests(tests["p"].to_numpy(), alpha=alpha, method=method)
    tests["p_corrected"] = corrected
    tests["reject"] = reject
    return tests[[*TEST_COLUMNS, "difference", "difference_low", "difference_high"]]


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Claim:
    """A finding to check: "``a`` beats ``b``", "``a`` is as good as ``b``", ...

    Attributes:
        text: the finding in words (e.g. the paper's).
        a: one group (a strategy or condition).
        b: the group it is compared with.
        kind: ``"greater"`` (mean of ``a`` above ``b``'s), ``"equivalent"`` (means within
            the margin) or ``"less_spread"`` (SD of ``a`` below ``b``'s); see :data:`RULES`.
        source: where the claim comes from (``"paper §4.3"``, ``"neonb"``).
    """

    text: str
    a: str
    b: str
    kind: str = "greater"
    source: str = "paper"

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ConfigError(f"a claim's kind must be one of {list(RULES)}, got {self.kind!r}")


def _direction_verdict(sign: float, p_corrected: float, alpha: float) -> str:
    if p_corrected < alpha:
        return HOLDS if sign > 0 else CONTRADICTED
    return NOT_CONTRADICTED if sign > 0 else NOT_SUPPORTED


def _claim_test(claim: Claim, x: np.ndarray, y: np.ndarray, margin: float) -> dict:
    """Statistic and uncorrected p of one claim (x: group a, y: group b, paired)."""
    d = x - y
    if claim.kind == "greater":
        return {"estimate": float(d.mean()), "sign": float(d.mean()), "p": _paired_t(x, y)[1]}
    if claim.kind == "equivalent":
        if _varies(d):
            p_tost = float(ttost_paired(x, y, -margin, margin)[0])
        else:  # every difference equal: within the margin or not, with certainty
            p_tost = 0.0 if abs(d.mean()) < margin else 1.0
        return {
            "estimate": float(d.mean()),
            "sign": 0.0,
            "p": p_tost,
            "p_difference": _paired_t(x, y)[1],
        }
    sd_x, sd_y = float(np.std(x, ddof=1)), float(np.std(y, ddof=1))
    if _varies(x + y) and _varies(d):
        p = float(stats.pearsonr(x + y, d).pvalue)
    else:
        p = 1.0
    return {"estimate": sd_x - sd_y, "sign": sd_y - sd_x, "p": p}


def check_claims(
    table: pd.DataFrame,
    value: str,
    claims: Sequence[Claim],
    *,
    by: str = "strategy",
    subject: str = "participant_id",
    margin: float = 0.01,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Decide each claim on paired per-subject scores, with the rule of its kind.

    Args:
        table: one row per (run,) group and subject; subjects are averaged over runs.
        value: the score column (e.g. ``"dice_mean_nobg"``).
        claims: the family of claims; their p-values are Bonferroni-corrected together.
        by: the group column.
        subject: the column identifying a test subject.
        margin: the equivalence margin of ``"equivalent"`` claims, in units of ``value``.
        alpha: family-wise error rate.

    Returns:
        One row per claim (index ``finding``): ``source``, ``a``, ``b``, ``kind``,
        ``mean_a``, ``mean_b``, ``sd_a``, ``sd_b``, ``difference`` (mean of ``a - b``; for
        a spread claim ``sd_a - sd_b``) with its 95 % interval
        ``difference_low``/``difference_high`` (none for spread), ``test``, ``p``,
        ``p_corrected``, ``verdict`` (one of :data:`VERDICTS`) and ``rule``.

    Raises:
        ConfigError: for a claim naming a missing group, subjects not scored in every
            group, a non-positive margin or alpha outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if not margin > 0:
        raise ConfigError(f"the equivalence margin must be positive, got {margin!r}")
    groups = list(dict.fromkeys(g for c in claims for g in (c.a, c.b)))
    wide = _paired(table, value, by, subject, groups)
    tested = [_claim_test(c, wide[c.a].to_numpy(), wide[c.b].to_numpy(), margin) for c in claims]
    m = len(claims)
    rows = {}
    for claim, test in zip(claims, tested, strict=True):
        x, y = wide[claim.a].to_numpy(), wide[claim.b].to_numpy()
        if claim.kind == "less_spread":  # the difference that claim is about: of the SDs
            difference, low, high = test["estimate"], float("nan"), float("nan")
        else:
            difference, low, high = mean_interval(x - y)
        p_corrected = min(1.0, m * test["p"])
        if claim.kind == "equivalent":
            if p_corrected < alpha:
                verdict = HOLDS
            elif min(1.0, m * test["p_difference"]) < alpha:
                verdict = CONTRADICTED
            else:
                verdict = NOT_CONTRADICTED
            name = f"TOST, margin ±{margin:g}"
        else:
            verdict = _direction_verdict(test["sign"], p_corrected, alpha)
            name = "paired t-test" if claim.kind == "greater" else "Pitman-Morgan test"
        rows[claim.text] = {
            "source": claim.source,
            "a": claim.a,
            "b": claim.b,
            "kind": claim.kind,
            "mean_a": float(x.mean()),
            "mean_b": float(y.mean()),
            "sd_a": float(np.std(x, ddof=1)),
            "sd_b": float(np.std(y, ddof=1)),
            "difference": difference,
            "difference_low": low,
            "difference_high": high,
            "test": f"{name}, {len(x)} subjects",
            "p": test["p"],
            "p_corrected": p_corrected,
            "verdict": verdict,
            "rule": RULES[claim.kind],
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("finding")
