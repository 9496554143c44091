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
