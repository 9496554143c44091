"""Tables beside the paper's, from known per-class Dice values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neonb import paper, report
from neonb.labels import DRAWEM9
from neonb.metrics import class_column
from neonb.report import case_class_dice, table1, table2, validation_class_dice


def _log(run: int, best_dice: float) -> pd.DataFrame:
    rows = []
    for epoch, nobg in ((1, 0.5), (2, 0.9), (3, 0.7)):
        row = {"epoch": epoch, "val_dice_nobg": nobg, "run": run}
        for index in DRAWEM9:
            row[class_column(index)] = best_dice if epoch == 2 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def _per_case(run: int, tissue: float, background: float) -> pd.DataFrame:
    rows = []
    for case in ("A", "B"):
        for index, label in DRAWEM9.items():
            rows.append(
                {
                    "run": run,
                    "participant_id": case,
                    "label": index,
                    "short_name": label.short_name,
                    "is_background": label.is_background,
                    "dice": background if label.is_background else tissue,
                }
            )
    return pd.DataFrame(rows)


def test_validation_takes_the_best_epoch_of_each_run():
    rows = validation_class_dice(pd.concat([_log(0, 0.8), _log(1, 0.6)]))
    assert len(rows) == 20
    assert rows.groupby("run")["dice"].mean().tolist() == pytest.approx([0.8, 0.6])


def test_table1_means_and_spread_over_runs():
    validation = validation_class_dice(pd.concat([_log(0, 0.8), _log(1, 0.6)]))
    test = case_class_dice(pd.concat([_per_case(0, 0.9, 0.4), _per_case(1, 0.7, 0.4)]))
    table = table1(pd.concat([validation, test]), label="ours")
    assert table.loc[("validation", "Mean DSC"), "ours"] == "0.700 ± 0.1"
    # test, all classes: run 0 = (8*0.9 + 2*0.4)/10 = 0.8, run 1 = 0.64
    assert table.loc[("test", "Mean DSC"), "ours"] == f"0.720 ± {np.std([0.8, 0.64], ddof=1):.1f}"
    assert table.loc[("test", "Mean DSC (no BG)"), "ours"] == "0.800 ± 0.1"
    assert table.loc[("test", "Mean DSC (no BG)"), "paper"] == "0.917 ± 0.003"


def test_table2_has_one_value_per_tissue_beside_the_paper():
    test = case_class_dice(_per_case(0, 0.9, 0.4))
    table = table2(test, label="ours")
    assert table.loc[("test", "ours"), "CSF"] == "0.900"  # one run: no spread
    assert table.loc[("test", "paper"), "Hippoc."] == "0.877"
    assert table.loc[("validation", "ours")].eq("").all()


@pytest.mark.parametrize("n_runs", [1, 3])
def test_single_run_has_no_spread(n_runs):
    test = case_class_dice(pd.concat([_per_case(r, 0.9, 0.4) for r in range(n_runs)]))
    value = table1(test).loc[("test", "Mean DSC (no BG)"), "neonb"]
    assert value == ("0.900" if n_runs == 1 else "0.900 ± 0")


def test_the_papers_age_deviation_is_the_root_of_its_mse():
    # §4.1.2: "MSE loss ... 2.45, corresponding to an average deviation of 1.57 weeks"
    reported = paper.AGEUNET
    assert "final training MAE (w)" not in reported
    assert math.sqrt(reported["final training MSE (w²)"]) == pytest.approx(
        reported["final training RMSE (w)"], abs=0.005
    )


def test_findings_view_shows_the_verdict_and_the_test_that_decided_it():
    from neonb.statistics import Claim, check_claims

    cases = pd.DataFrame(
        {
            "strategy": ["a"] * 4 + ["b"] * 4,
            "participant_id": ["s1", "s2", "s3", "s4"] * 2,
            "dice": [0.9, 0.8, 0.85, 0.7, 0.8, 0.7, 0.75, 0.6],
        }
    )
    findings = check_claims(cases, "dice", [Claim("a beats b", "a", "b")])
    findings.insert(0, "paper (dHCP)", "reported")
    view = report.findings_view(findings)
    assert list(view.columns) == report.FINDING_COLUMNS
    assert view.loc["a beats b", "verdict"] == "holds"
    assert view.loc["a beats b", "difference"] == pytest.approx(0.1)
