"""The plan of ``params/paper`` on a folder shaped like the dHCP third release (tiny images)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from release_fixture import RELEASE_COMPLETE, make_release

from neonb import splits
from neonb.cli import main
from neonb.errors import ConfigError
from neonb.plan import (
    CHAPTERS_FILE,
    PLAN_COLUMNS,
    PLAN_FILE,
    RUNS_FILE,
    check_plan,
    plan_study,
)

PAPER = Path(__file__).resolve().parents[1] / "params" / "paper"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The paper's plan on the release fixture, run in a folder of its own."""
    base = tmp_path_factory.mktemp("paper-plan")
    root = make_release(base / "rel3")
    with contextlib.chdir(base):
        plan = plan_study(PAPER, data_root=root)
    return plan, base, root


def _sizes(plan, chapter: str) -> dict[str, int]:
    rows = plan.sets[plan.sets["chapter"] == chapter]
    return dict(zip(rows["set"], rows["sessions"], strict=True))


def test_the_paper_plan_has_the_papers_sizes_in_sessions(planned):
    plan, _, _ = planned
    assert plan.ok, plan.failures
    assert _sizes(plan, "00_data")["complete"] == RELEASE_COMPLETE
    for chapter in ("01_pipeline", "02_ageunet"):
        assert _sizes(plan, chapter) == {"train": 114, "val": 28, "test": 100}
    budget = _sizes(plan, "03_budgeting")
    assert budget["full"] == 114
    assert all(budget[plane] == 342 for plane in ("random", "sagittal", "coronal", "axial"))
    assert (budget["val"], budget["test"]) == (28, 100)
    assert _sizes(plan, "04_transfer") == {
        "source_train": 90,
        "source_val": 10,
        "target_train": 40,
        "target_test": 80,
    }
    # a session per participant in every set and condition
    assert (plan.sets["sessions"] == plan.sets["participants"]).iloc[2:].all()


def test_no_infant_is_in_two_sets_of_one_experiment(planned):
    _, base, _ = planned
    tables = splits.load_study_splits(base / "results" / "paper")
    for name, sets in (("pipeline", splits.PIPELINE_SETS), ("transfer", splits.TRANSFER_SETS)):
        used = tables[name][tables[name]["split"].isin(sets)]
        assert not used["participant_id"].duplicated().any(), name
    transfer = tables["transfer"]
    source = transfer[transfer["split"].str.startswith("source")]
    target = transfer[transfer["split"].str.startswith("target")]
    assert target["scan_age"].max() < source["scan_age"].min()
    assert target["scan_age"].min() == pytest.approx(26.71)
    assert source["scan_age"].max() == pytest.approx(45.14)


def test_the_sessions_left_out_are_counted(planned):
    plan, base, root = planned
    from neonb.data import read_manifest

    complete = splits.complete_sessions(read_manifest(root, images="plain", progress=False))
    second = len(complete) - complete["participant_id"].nunique()
    pipeline = splits.read_splits(base / "results" / "paper" / "splits_pipeline.tsv")
    assert (pipeline["split"] == splits.EXCLUDED).sum() == second > 0
    assert any(note.startswith(f"pipeline: {second} session(s) left out") for note in plan.notes)


def test_the_plan_is_written_and_lists_every_run(planned):
    plan, base, _ = planned
    folder = base / "results" / "paper"
    sets = pd.read_csv(folder / PLAN_FILE, sep="\t")
    assert list(sets.columns) == PLAN_COLUMNS and len(sets) == len(plan.sets)
    runs = pd.read_csv(folder / RUNS_FILE, sep="\t")
    by_chapter = runs.groupby("chapter")["run"].apply(list).to_dict()
    assert by_chapter["01_pipeline"] == ["run-0", "run-1", "run-2", "run-3"]
    variants = ["paper", "standardized", "head_lr", "alpha_ramp", "staged"]
    assert by_chapter["02_ageunet"] == [f"{v}/run-{k}" for v in variants for k in (0, 1)]
    assert by_chapter["04_transfer"] == [
        "source",
        *(f"{s}/run-0" for s in ("shallow", "medium", "deep", "full", "scratch")),
    ]
    assert {"full/run-0", "axial/run-0", "random/run-0"} <= set(by_chapter["03_budgeting"])
    # 60 epochs of 57 steps per pipeline run: the paper's 18.6 T4 hours each
    pipeline = runs[runs["chapter"] == "01_pipeline"]
    assert (pipeline["steps"] == 60 * 57).all()
    assert pipeline["t4_hours"].tolist() == pytest.approx([18.6] * 4)
    chapters = pd.read_csv(folder / CHAPTERS_FILE, sep="\t").set_index("chapter")
    assert chapters.loc["01_pipeline", "t4_hours"] == pytest.approx(74.4)
    assert chapters.loc["03_budgeting", "runs"] == len(by_chapter["03_budgeting"])


def test_budgeting_conditions_spend_their_slices(planned):
    plan, _, _ = planned
    rows = plan.sets[plan.sets["chapter"] == "03_budgeting"].set_index("set")
    conditions = ["full", "random", "sagittal", "coronal", "axial"]
    assert (rows.loc[conditions, "annotated_slices"] > 0).all()
    assert rows.loc[["val", "test"], "annotated_slices"].isna().all()


def test_splits_drawn_by_the_plan_are_read_back_not_redrawn(planned, tmp_path):
    plan, base, root = planned
    folder = base / "results" / "paper"
    before = (folder / "splits_pipeline.tsv").stat().st_mtime_ns
    with contextlib.chdir(base):
        again = plan_study(PAPER, data_root=root, write=False)
    assert (folder / "splits_pipeline.tsv").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again.sets, plan.sets)


def _params_copy(tmp_path: Path, **changes: str) -> Path:
    params = tmp_path / "params"
    shutil.copytree(PAPER, params)
    for file, line in changes.items():
        path = params / f"{file}.yaml"
        path.write_text(path.read_text() + f"\n{line}\n")
    return params


def test_a_chapter_that_cannot_be_planned_is_one_line_naming_it(planned, tmp_path, capsys):
    _, _, root = planned
    params = _params_copy(tmp_path, **{"03_budgeting": "n_full: 500"})
    with contextlib.chdir(tmp_path):
        with pytest.raises(ConfigError, match="^03_budgeting: n_full is 500 but the training"):
            check_plan(params, data_root=root, echo=lambda *a, **k: None)
        status = main(["study", "--plan", "--params", str(params), "--data", str(root)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err and "03_budgeting: n_full is 500" in err


def test_splits_too_large_for_the_data_stop_the_plan_at_chapter_00(planned, tmp_path):
    _, _, root = planned
    params = _params_copy(tmp_path, study="n_test: 700")
    with contextlib.chdir(tmp_path), pytest.raises(ConfigError, match="^00_data: the pipeline"):
        plan_study(params, data_root=root)
