"""Pairwise t-tests with multiplicity correction, checked against scipy, statsmodels and by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from neonb import paper, report
from neonb.errors import ConfigError
from neonb.statistics import TEST_COLUMNS, pairwise_ttests, upper_triangle

GROUPS = {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0], "c": [2.0, 3.0, 4.5, 3.5]}


@pytest.fixture
def table():
    rows = [(g, v) for g, values in GROUPS.items() for v in values]
    return pd.DataFrame(rows, columns=["strategy", "dice"])


def test_student_t_test_by_hand_and_bonferroni(table):
    tests = pairwise_ttests(table, "dice")
    assert list(tests.columns) == TEST_COLUMNS
    assert list(zip(tests["group_a"], tests["group_b"], strict=True)) == [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
    ]
    ab = tests.iloc[0]
    # means 2 and 5, pooled variance 1, n = 3 + 3: t = -3 / sqrt(2/3), 4 degrees of freedom
    assert ab["t"] == pytest.approx(-3 / np.sqrt(2 / 3))
    assert ab["p"] == pytest.approx(0.0213116, abs=1e-6)
    assert ab["p_corrected"] == pytest.approx(3 * ab["p"])
    assert (tests["p_corrected"] == np.minimum(1, 3 * tests["p"])).all()
    assert list(tests["reject"]) == list(tests["p_corrected"] < 0.05)


def test_matches_scipy_and_statsmodels(table):
    for equal_var, method in ((True, "bonferroni"), (False, "holm")):
        tests = pairwise_ttests(table, "dice", equal_var=equal_var, method=method, alpha=0.1)
        expected = [
            stats.ttest_ind(GROUPS[a], GROUPS[b], equal_var=equal_var)
            for a, b in (("a", "b"), ("a", "c"), ("b", "c"))
        ]
        np.testing.assert_allclose(tests["t"], [e.statistic for e in expected])
        np.testing.assert_allclose(tests["p"], [e.pvalue for e in expected])
        reject, corrected, _, _ = multipletests(
            [e.pvalue for e in expected], alpha=0.1, method=method
        )
        np.testing.assert_allclose(tests["p_corrected"], corrected)
        assert list(tests["reject"]) == list(reject)


def test_order_selects_and_orders_groups_and_drops_nan(table):
    with_nan = pd.concat([table, pd.DataFrame({"strategy": ["c"], "dice": [np.nan]})])
    tests = pairwise_ttests(with_nan, "dice", order=["c", "a"])
    assert len(tests) == 1
    row = tests.iloc[0]
    assert (row["group_a"], row["group_b"], row["n_a"], row["n_b"]) == ("c", "a", 4, 3)
    assert row["p_corrected"] == pytest.approx(row["p"])  # one pair: nothing to correct
    assert row["t"] > 0  # c has the larger mean


def test_bad_input_is_refused(table):
    with pytest.raises(ConfigError, match="no column 'dsc'"):
        pairwise_ttests(table, "dsc")
    with pytest.raises(ConfigError, match=r"\['z'\]"):
        pairwise_ttests(table, "dice", order=["a", "z"])
    with pytest.raises(ConfigError, match="at least 2 values"):
        pairwise_ttests(table.iloc[[0, 3, 4]], "dice")
    with pytest.raises(ConfigError, match="two groups"):
        pairwise_ttests(table, "dice", order=["a"])
    with pytest.raises(ConfigError, match="alpha"):
        pairwise_ttests(table, "dice", alpha=1.5)


def test_upper_triangle_has_the_papers_layout():
    order = ["shallow", "medium", "deep", "full", "scratch"]
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"strategy": np.repeat(order, 5), "dice": rng.normal(0.8, 0.05, 25)})
    tests = pairwise_ttests(table, "dice", order=order)
    square = upper_triangle(tests)
    reference = paper.table5()
    assert list(square.index) == list(reference.index) == order
    assert list(square.columns) == list(reference.columns)
    assert square.notna().to_numpy().tolist() == reference.notna().to_numpy().tolist()
    assert (
        square.loc["deep", "scratch"]
        == tests.set_index(["group_a", "group_b"]).loc[("deep", "scratch"), "p_corrected"]
    )
    flipped = upper_triangle(tests, order=order[::-1])  # pairs land above the diagonal
    assert flipped.loc["scratch", "deep"] == square.loc["deep", "scratch"]
    assert np.isnan(flipped.loc["deep", "scratch"])
    with pytest.raises(ConfigError, match="no column"):
        upper_triangle(tests, "q")


def test_tests_beside_the_papers_p_values():
    order = ["shallow", "medium", "full"]
    table = pd.DataFrame(
        {
            "strategy": np.repeat(order, 4),
            "dice": [0.1, 0.2, 0.15, 0.12, 0.8, 0.82, 0.79, 0.81, 0.8, 0.81, 0.83, 0.78],
        }
    )
    tests = report.pairwise_beside_paper(pairwise_ttests(table, "dice"), paper.table5())
    assert tests["p_corrected_paper"].tolist() == [1.67e-7, 4.40e-3, 5.67e-1]
    square = report.pvalue_triangle(tests)
    assert square.loc["shallow", "medium"].endswith("* (paper 1.7e-07)")
    assert "*" not in square.loc["medium", "full"]
    assert square.loc["full", "shallow"] == ""
