"""Tables that put neonb's results beside the paper's (Richter & Fetit 2022).

The notebooks compute per-class Dice for every run; these functions reduce them to the
paper's tables and add the paper's numbers (:mod:`neonb.paper`) as a column or row, so a
reader compares like with like. Values are means over runs, with ``± std`` when there
was more than one run.

The mean Dice of a set is the mean over classes of the class Dice, and a class's Dice is
its mean over the set's cases (validation patches or test volumes), ``NaN`` skipped. "no
BG" leaves out the two background classes (labels 0 and 4).
"""

from __future__ import annotations

import pandas as pd

from neonb import paper
from neonb.labels import DRAWEM9
from neonb.metrics import class_column, format_mean_std

SETS = ("validation", "test")
MEAN_METRICS = ("Mean DSC", "Mean DSC (no BG)")


def validation_class_dice(logs: pd.DataFrame) -> pd.DataFrame:
    """Per-class validation Dice of each run's best epoch (by Dice without background).

    Args:
        logs: epoch logs (``log.tsv``) with a ``run`` column.

    Returns:
        Tidy rows ``run, set, label, short_name, is_background, dice``.
    """
    rows = []
    for run, log in logs.groupby("run", sort=True):
        best = log.loc[log["val_dice_nobg"].idxmax()]
        for index, label in DRAWEM9.items():
            rows.append(
                {
                    "run": run,
                    "set": "validation",
                    "label": index,
                    "short_name": label.short_name,
                    "is_background": label.is_background,
                    "dice": best[class_column(index)],
                }
            )
    return pd.DataFrame(rows)


def case_class_dice(per_case: pd.DataFrame, set_name: str = "test") -> pd.DataFrame:
    """Per-class Dice averaged over cases, per run.

    Args:
        per_case: :func:`neonb.metrics.evaluate_case` rows of every case, with ``run``.
        set_name: the value of the ``set`` column.

    Returns:
        Tidy rows ``run, set, label, short_name, is_background, dice``.
    """
    keys = ["run", "label", "short_name", "is_background"]
    table = per_case.groupby(keys, sort=True)["dice"].mean().reset_index()
    table.insert(1, "set", set_name)
    return table


def _mean_dice(class_dice: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice with and without background per run and set."""
    groups = class_dice.groupby(["set", "run"], sort=False)
    tissue = class_dice[~class_dice["is_background"]].groupby(["set", "run"], sort=False)
    return pd.DataFrame(
        {MEAN_METRICS[0]: groups["dice"].mean(), MEAN_METRICS[1]: tissue["dice"].mean()}
    ).reset_index()


def _formatted(values: pd.Series, decimals: int = 3) -> str:
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return format_mean_std(values.mean(), std, decimals)


def table1(class_dice: pd.DataFrame, label: str = "neonb") -> pd.DataFrame:
    """The paper's Table 1: mean Dice with and without background, validation and test.

    Args:
        class_dice: rows of :func:`validation_class_dice` and :func:`case_class_dice`.
        label: heading of neonb's column (say which data and hardware).

    Returns:
        Rows ``(set, metric)``; columns ``label`` (mean ± std over runs) and ``paper``.
    """
    means = _mean_dice(class_dice)
    reference = paper.table1()
    rows = {}
    for set_name in SETS:
        part = means[means["set"] == set_name]
        for metric in MEAN_METRICS:
            ref = reference.loc[(set_name, metric)]
            rows[(set_name, metric)] = {
                label: _formatted(part[metric]) if len(part) else "",
                "paper": format_mean_std(ref["mean"], ref["std"]),
            }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["set", "metric"])


def table2(class_dice: pd.DataFrame, label: str = "neonb") -> pd.DataFrame:
    """The paper's Table 2: Dice per tissue, validation and test, neonb beside the paper.

    Returns:
        Rows ``(set, source)`` with source ``label`` or ``paper``; one column per tissue.
    """
    reference = paper.table2()
    tissue = class_dice[~class_dice["is_background"]]
    rows = {}
    for set_name in SETS:
        part = tissue[tissue["set"] == set_name]
        ours = part.groupby("short_name", sort=False)["dice"].apply(_formatted)
        rows[(set_name, label)] = {t: ours.get(t, "") for t in paper.TISSUES}
        rows[(set_name, "paper")] = {k: f"{v:.3f}" for k, v in reference.loc[set_name].items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["set", "source"])


def table4(per_case: pd.DataFrame, label: str = "neonb", by: str = "strategy") -> pd.DataFrame:
    """The paper's Table 4: Dice per tissue of each transfer strategy, beside the paper's.

    Args:
        per_case: :func:`neonb.metrics.evaluate_case` rows of every test case, with a
            column ``by`` naming the strategy (``none``, ``shallow``, ... as in
            :func:`neonb.paper.table4`).
        label: the name of neonb's rows (say which data and hardware).
        by: the column naming the strategy.

    Returns:
        Rows ``(strategy, source)`` with source ``label`` or ``paper``, in the order the
        strategies appear in ``per_case``; one column per tissue: the class Dice averaged
        over the test cases (``NaN`` skipped), rounded to 3 decimals.
    """
    reference = paper.table4()
    tissue = per_case[~per_case["is_background"]]
    ours = tissue.groupby([by, "short_name"], sort=False)["dice"].mean().unstack()
    rows = {}
    for strategy in dict.fromkeys(per_case[by]):
        rows[(strategy, label)] = ours.loc[strategy, paper.TISSUES].round(3).to_dict()
        if strategy in reference.index:
            rows[(strategy, "paper")] = reference.loc[strategy].to_dict()
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis([by, "source"])


def pairwise_beside_paper(tests: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Pairwise tests (:func:`neonb.statistics.pairwise_ttests`) with the paper's corrected p.

    Args:
        tests: rows of :func:`neonb.statistics.pairwise_ttests`.
        reference: the paper's upper triangle (:func:`neonb.paper.table5` or ``table6``).

    Returns:
        ``tests`` with a column ``p_corrected_paper`` (``NaN`` for a pair the paper did
        not test).
    """

    def lookup(a: str, b: str) -> float:
        for row, col in ((a, b), (b, a)):
            if row in reference.index and col in reference.columns:
                value = reference.loc[row, col]
                if pd.notna(value):
                    return float(value)
        return float("nan")

    out = tests.copy()
    pairs = zip(tests["group_a"], tests["group_b"], strict=True)
    out["p_corrected_paper"] = [lookup(a, b) for a, b in pairs]
    return out


def pvalue_triangle(tests: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Corrected p of each pair as the paper prints them, with the paper's in brackets.

    Args:
        tests: rows of :func:`pairwise_beside_paper` (or of
            :func:`neonb.statistics.pairwise_ttests` and a ``reference``).
        reference: the paper's upper triangle, if ``tests`` lacks ``p_corrected_paper``.

    Returns:
        Strategies as rows and columns; above the diagonal ``"3.1e-02 (paper 1.7e-07)"``,
        marked ``*`` when neonb's corrected p is below 0.05; empty elsewhere.
    """
    if reference is not None:
        tests = pairwise_beside_paper(tests, reference)
    names = list(dict.fromkeys([*tests["group_a"], *tests["group_b"]]))
    square = pd.DataFrame("", index=names, columns=names)
    for row in tests.itertuples(index=False):
        text = f"{row.p_corrected:.1e}{' *' if row.p_corrected < 0.05 else ''}"
        if pd.notna(row.p_corrected_paper):
            text += f" (paper {row.p_corrected_paper:.1e})"
        square.loc[row.group_a, row.group_b] = text
    return square


def table3(class_dice: pd.DataFrame, label: str = "neonb") -> pd.DataFrame:
    """The paper's Table 3: mean Dice of the label-budgeting conditions, beside the paper's.

    Args:
        class_dice: rows of :func:`validation_class_dice` and :func:`case_class_dice` with a
            ``condition`` column holding the paper's condition names (``random``,
            ``sagittal``, ``coronal``, ``axial``, ``full``); other conditions are ignored.
        label: the ``source`` of neonb's rows (say which data and hardware).

    Returns:
        Rows ``(condition, source)`` with source ``label`` or ``paper``, in the paper's
        order; columns ``(set, metric)``. A condition neonb did not run has empty cells.
    """
    reference = paper.table3()
    rows = {}
    for condition in reference.index:
        part = class_dice[class_dice["condition"] == condition]
        means = _mean_dice(part) if len(part) else pd.DataFrame(columns=["set", *MEAN_METRICS])
        ours = {}
        for set_name in SETS:
            values = means[means["set"] == set_name]
            for metric in MEAN_METRICS:
                ours[(set_name, metric)] = _formatted(values[metric]) if len(values) else ""
        rows[(condition, label)] = ours
        paper_row = reference.loc[condition]
        rows[(condition, "paper")] = {key: f"{v:.3f}" for key, v in paper_row.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["condition", "source"])
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["set", "metric"])
    return table


FINDING_COLUMNS: list[str] = [
    "paper (dHCP)",
    "source",
    "difference",
    "difference_low",
    "difference_high",
    "test",
    "p_corrected",
    "verdict",
]
"""The columns of :func:`neonb.statistics.check_claims` rows that a chapter shows."""


def findings_view(findings: pd.DataFrame, decimals: int = 4) -> pd.DataFrame:
    """The paper's findings as a chapter shows them: what the paper reports, the difference
    with its 95 % interval, the test that decided, its corrected p and the verdict.

    Args:
        findings: rows of :func:`neonb.statistics.check_claims` with a ``paper (dHCP)``
            column (:func:`neonb.budgeting.paper_findings`, :func:`neonb.transfer.paper_findings`).
        decimals: rounding of the numbers.
    """
    return findings[[c for c in FINDING_COLUMNS if c in findings.columns]].round(decimals)
