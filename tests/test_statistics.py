"""Pairwise t-tests with multiplicity correction, checked against scipy, statsmodels and by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from neonb import paper, report
from neonb.errors import ConfigError
from neonb.statistics import (
    CONTRADICTED,
    HOLDS,
    NOT_CONTRADICTED,
    NOT_SUPPORTED,
    RULES,
    TEST_COLUMNS,
    Claim,
    average_runs,
    check_claims,
    mean_interval,
    pairwise_paired_tests,
    pairwise_ttests,
    replicate_summary,
    upper_triangle,
)

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


# --------------------------------------------------------------------------- replicates


def _replicated(
    means: dict[str, float],
    n_subjects: int = 12,
    n_runs: int = 3,
    seed: int = 0,
    noise: float = 0.002,
    run_noise: float = 0.002,
):
    """Scores of every group on the same subjects, several runs each.

    A run's effect is shared by all its subjects; ``noise`` is each score's own.
    """
    rng = np.random.default_rng(seed)
    subject_effect = rng.normal(0.0, 0.03, n_subjects)
    rows = []
    for group, mean in means.items():
        for run in range(n_runs):
            run_effect = rng.normal(0.0, run_noise)
            for s in range(n_subjects):
                score = mean + subject_effect[s] + run_effect + rng.normal(0.0, noise)
                rows.append((group, run, f"s{s:02d}", score))
    return pd.DataFrame(rows, columns=["strategy", "run", "participant_id", "dice"])


def test_mean_interval_is_scipys_t_interval():
    values = [0.80, 0.82, 0.85, 0.79]
    mean, low, high = mean_interval(values)
    expected = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx(expected)
    assert np.isnan(mean_interval([0.8])[1]) and mean_interval([0.8])[0] == 0.8
    assert mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert mean_interval([0.4, float("nan"), 0.6])[0] == pytest.approx(0.5)


def test_replicate_summary_intervals_over_runs_and_subjects():
    table = _replicated({"full": 0.85, "deep": 0.80})
    summary = replicate_summary(table, "dice").set_index("strategy")
    full = table[table["strategy"] == "full"]
    per_run = full.groupby("run")["dice"].mean()
    per_subject = full.groupby("participant_id")["dice"].mean()
    assert summary.loc["full", "n_runs"] == 3 and summary.loc["full", "n_subjects"] == 12
    assert summary.loc["full", "mean"] == pytest.approx(full["dice"].mean())
    assert (summary.loc["full", "run_low"], summary.loc["full", "run_high"]) == pytest.approx(
        mean_interval(per_run)[1:]
    )
    assert (
        summary.loc["full", "subject_low"],
        summary.loc["full", "subject_high"],
    ) == pytest.approx(mean_interval(per_subject)[1:])
    # subjects differ far more than runs here, so the interval over subjects is wider
    width = summary["subject_high"] - summary["subject_low"]
    assert (width > summary["run_high"] - summary["run_low"]).all()


def test_average_runs_gives_one_row_per_subject():
    table = _replicated({"a": 0.8, "b": 0.9}, n_subjects=4, n_runs=3)
    averaged = average_runs(table, "dice")
    assert len(averaged) == 8 and (averaged["n_runs"] == 3).all()
    one = table[(table["strategy"] == "a") & (table["participant_id"] == "s01")]
    row = averaged[(averaged["strategy"] == "a") & (averaged["participant_id"] == "s01")]
    assert float(row["dice"].iloc[0]) == pytest.approx(one["dice"].mean())


def test_paired_tests_find_what_independent_tests_miss():
    # a constant 0.01 advantage hidden in a subject spread of 0.03
    table = _replicated({"deep": 0.81, "medium": 0.80})
    paired = pairwise_paired_tests(table, "dice").iloc[0]
    averaged = average_runs(table, "dice")
    independent = pairwise_ttests(averaged, "dice").iloc[0]
    wide = averaged.pivot(index="participant_id", columns="strategy", values="dice")
    assert paired["p"] == pytest.approx(stats.ttest_rel(wide["deep"], wide["medium"]).pvalue)
    assert paired["p"] < 0.001 < 0.05 < independent["p"]
    assert paired["difference_low"] < paired["difference"] < paired["difference_high"]
    assert paired["difference"] == pytest.approx(0.01, abs=0.003)


def test_paired_tests_refuse_subjects_missing_from_a_group():
    table = _replicated({"a": 0.8, "b": 0.9}, n_subjects=4, n_runs=1)
    table = table.drop(index=table.index[-1])
    with pytest.raises(ConfigError, match="same subjects.*s03"):
        pairwise_paired_tests(table, "dice")


@pytest.mark.parametrize(
    ("means", "kind", "noise", "verdict"),
    [
        ({"a": 0.85, "b": 0.80}, "greater", 0.002, HOLDS),
        ({"a": 0.80, "b": 0.85}, "greater", 0.002, CONTRADICTED),
        ({"a": 0.800, "b": 0.801}, "equivalent", 0.002, HOLDS),
        ({"a": 0.85, "b": 0.80}, "equivalent", 0.002, CONTRADICTED),
    ],
)
def test_claims_follow_their_rule(means, kind, noise, verdict):
    table = _replicated(means, n_subjects=12, n_runs=3, seed=3, noise=noise)
    checked = check_claims(table, "dice", [Claim("a vs b", "a", "b", kind)], margin=0.01)
    row = checked.loc["a vs b"]
    assert row["verdict"] == verdict
    assert row["rule"] == RULES[kind]
    assert row["difference"] == pytest.approx(means["a"] - means["b"], abs=0.003)


@pytest.mark.parametrize(("sign", "verdict"), [(1, NOT_CONTRADICTED), (-1, NOT_SUPPORTED)])
def test_an_insignificant_difference_is_named_by_its_direction(sign, verdict):
    base = np.linspace(0.75, 0.85, 8)
    differences = sign * (0.001 + 0.03 * np.array([1, -1, 1, -1, 1, -1, 1, -1]))
    rows = [("b", 0, f"s{i}", v) for i, v in enumerate(base)]
    rows += [("a", 0, f"s{i}", v) for i, v in enumerate(base + differences)]
    table = pd.DataFrame(rows, columns=["strategy", "run", "participant_id", "dice"])
    row = check_claims(table, "dice", [Claim("a > b", "a", "b")]).iloc[0]
    assert row["p"] > 0.5
    assert row["verdict"] == verdict


def test_equivalence_needs_evidence_not_just_no_difference():
    # a tiny sample with a large spread: no difference found, and no equivalence shown
    rng = np.random.default_rng(1)
    rows = [(g, 0, f"s{s}", 0.8 + rng.normal(0, 0.05)) for g in ("a", "b") for s in range(3)]
    table = pd.DataFrame(rows, columns=["strategy", "run", "participant_id", "dice"])
    row = check_claims(table, "dice", [Claim("a ~ b", "a", "b", "equivalent")]).iloc[0]
    assert row["verdict"] == NOT_CONTRADICTED


def test_bonferroni_over_the_family_of_claims():
    table = _replicated({"a": 0.803, "b": 0.80, "c": 0.70}, seed=5)
    one = check_claims(table, "dice", [Claim("a > b", "a", "b")])
    two = check_claims(table, "dice", [Claim("a > b", "a", "b"), Claim("a > c", "a", "c")])
    assert two.loc["a > b", "p"] == pytest.approx(one.loc["a > b", "p"])
    assert two.loc["a > b", "p_corrected"] == pytest.approx(min(1, 2 * one.loc["a > b", "p"]))


def test_spread_claim_uses_the_pitman_morgan_test():
    rng = np.random.default_rng(2)
    base = rng.normal(0.8, 0.01, 30)
    rows = [("narrow", 0, f"s{i}", v) for i, v in enumerate(base)]
    wide_scores = 0.8 + 4 * (base - 0.8) + rng.normal(0, 0.01, 30)
    rows += [("wide", 0, f"s{i}", v) for i, v in enumerate(wide_scores)]
    table = pd.DataFrame(rows, columns=["strategy", "run", "participant_id", "dice"])
    row = check_claims(table, "dice", [Claim("spread", "narrow", "wide", "less_spread")]).iloc[0]
    expected = stats.pearsonr(base + wide_scores, base - wide_scores).pvalue
    assert row["p"] == pytest.approx(expected)
    assert row["verdict"] == HOLDS and row["sd_a"] < row["sd_b"]
    assert row["difference"] == pytest.approx(row["sd_a"] - row["sd_b"])
    assert np.isnan(row["difference_low"])


def test_claims_check_their_arguments():
    table = _replicated({"a": 0.8, "b": 0.9}, n_subjects=4, n_runs=1)
    with pytest.raises(ConfigError, match="kind"):
        Claim("x", "a", "b", "bigger")
    with pytest.raises(ConfigError, match="no rows with strategy"):
        check_claims(table, "dice", [Claim("x", "a", "z")])
    with pytest.raises(ConfigError, match="margin"):
        check_claims(table, "dice", [Claim("x", "a", "b")], margin=0)


def test_paired_tests_and_claims_agree_when_every_subject_moves_alike():
    # b is a plus exactly 0.05 for every subject: no t-test is defined, the answer is certain
    a = [0.70, 0.75, 0.80, 0.85]
    rows = [
        (g, f"s{i}", v + shift) for g, shift in (("a", 0.0), ("b", 0.05)) for i, v in enumerate(a)
    ]
    rows += [("c", f"s{i}", v) for i, v in enumerate(a)]
    table = pd.DataFrame(rows, columns=["strategy", "participant_id", "dice"])
    tests = pairwise_paired_tests(table, "dice").set_index(["group_a", "group_b"])
    assert tests.loc[("a", "b"), "p"] == 0.0 and tests.loc[("a", "b"), "reject"]
    assert tests.loc[("a", "b"), "t"] == -math.inf  # a - b is -0.05 for every subject
    assert tests.loc[("a", "c"), "p"] == 1.0 and not tests.loc[("a", "c"), "reject"]
    claims = check_claims(table, "dice", [Claim("b > a", "b", "a"), Claim("a > c", "a", "c")])
    assert claims.loc["b > a", "p"] == tests.loc[("a", "b"), "p"]
    assert list(claims["verdict"]) == [HOLDS, NOT_SUPPORTED]
