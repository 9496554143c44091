"""The robustness chapter's analysis: severity tables, losses, goals and the QC study's ROC."""

import numpy as np
import pandas as pd
import pytest
import torch

from neonb import robustness
from neonb.errors import DataError
from neonb.inference import load_weights
from neonb.models import ModelConfig, build_model


def _scores(losses: dict[str, float], clean: dict[str, float], n: int = 5) -> pd.DataFrame:
    """Scores of networks on n sessions: clean, then one shift at two levels, whose top level
    loses ``losses[model]`` (plus a small per-session wobble)."""
    rng = np.random.default_rng(0)
    rows = []
    for model in losses:
        for s in range(n):
            base = clean[model] + rng.normal(0, 0.005)
            for shift, level, severity, value in [
                ("none", 0, 0.0, base),
                ("noise", 1, 0.1, base - losses[model] / 2),
                ("noise", 2, 0.2, base - losses[model] + rng.normal(0, 0.002)),
            ]:
                rows.append(
                    {
                        "model": model,
                        "shift": shift,
                        "level": level,
                        "severity": severity,
                        "participant_id": f"P{s}",
                        "session_id": f"1{shift}",
                        "source_session_id": "1",
                        "scan_age": 40.0,
                        "dice_mean_nobg": value,
                        "dice_mean": value,
                    }  # fmt: skip
                )
    return pd.DataFrame(rows)


def test_severity_table_puts_clean_at_severity_zero_of_every_shift():
    scores = _scores({"paper": 0.3, "randomized": 0.02}, {"paper": 0.9, "randomized": 0.89})
    table = robustness.severity_table(scores)
    paper = table[(table["model"] == "paper") & (table["shift"] == "noise")]
    assert list(paper["severity"]) == [0.0, 0.1, 0.2]
    assert paper["mean"].iloc[0] == pytest.approx(0.9, abs=0.01)
    assert paper["mean"].iloc[2] == pytest.approx(0.6, abs=0.01)
    assert (paper["low"] <= paper["mean"]).all() and (paper["mean"] <= paper["high"]).all()
    assert "none" not in set(table["shift"])


def test_severe_losses_are_clean_minus_the_top_level():
    scores = _scores({"paper": 0.3, "randomized": 0.02}, {"paper": 0.9, "randomized": 0.89})
    losses = robustness.severe_losses(scores).set_index("model")
    assert losses.loc["paper", "loss"] == pytest.approx(0.3, abs=0.005)
    assert losses.loc["randomized", "loss"] == pytest.approx(0.02, abs=0.005)
    assert losses.loc["paper", "severity"] == 0.2


def test_goals_hold_when_the_randomized_network_barely_loses():
    scores = _scores({"paper": 0.3, "randomized": 0.01}, {"paper": 0.9, "randomized": 0.9})
    goals = robustness.check_goals(scores, max_loss=0.05, clean_margin=0.03)
    verdicts = dict(zip(goals["family"], goals["verdict"], strict=True))
    assert verdicts == {"loss at most": "holds", "paper loses more": "holds", "clean": "holds"}


def test_goals_are_contradicted_when_the_randomized_network_loses_most():
    scores = _scores({"paper": 0.01, "randomized": 0.3}, {"paper": 0.9, "randomized": 0.7})
    goals = robustness.check_goals(scores, max_loss=0.05, clean_margin=0.03)
    verdicts = dict(zip(goals["family"], goals["verdict"], strict=True))
    assert verdicts == {
        "loss at most": "contradicted",
        "paper loses more": "contradicted",
        "clean": "contradicted",
    }
    assert "TOST" in goals.set_index("family").loc["clean", "test"]


def test_roc_auc_counts_pairs_ranked_right():
    assert robustness.roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert robustness.roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert robustness.roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert np.isnan(robustness.roc_auc([0.1, 0.2], [False, False]))


def test_qc_separation_scores_the_flag_against_dice():
    qc = pd.DataFrame(
        {
            "qc_uncertainty": [0.30, 0.25, 0.05, 0.04, 0.20],
            "qc_flag": [True, True, False, False, True],
            "dice_mean_nobg": [0.40, 0.50, 0.90, 0.92, 0.85],
        }
    )
    result = robustness.qc_separation(qc, dice_threshold=0.8)
    assert result["below threshold"] == 2
    assert result["ROC AUC"] == 1.0
    assert result["flagged"] == 3
    assert result["sensitivity"] == 1.0
    assert result["specificity"] == pytest.approx(2 / 3)
    assert result["Spearman rho"] < -0.5


def test_load_weights_keeps_the_filters_of_the_wanted_channels(tmp_path):
    config = ModelConfig(filters=(4, 4, 8, 8, 8), strides=(1, 2, 2, 2, 2), deep_supr_num=1)
    torch.manual_seed(0)
    both = build_model(config)
    path = tmp_path / "model_best.pt"
    torch.save(both.state_dict(), path)
    one = build_model(ModelConfig(**{**config.to_dict(), "in_channels": 1}))
    load_weights(one, path, channels=(("t1w", "t2w"), ("t2w",)))
    saved, loaded = both.state_dict(), one.state_dict()
    first = [k for k in saved if saved[k].shape != loaded[k].shape]
    assert first, "some layer reads the input channels"
    for key in first:
        assert torch.equal(loaded[key], saved[key][:, 1:2])
    same = [k for k in saved if k not in first]
    assert all(torch.equal(saved[k], loaded[k]) for k in same)
    with pytest.raises(DataError, match="no weights for"):
        load_weights(one, path, channels=(("t2w",), ("t1w",)))


def test_robustness_runs_change_the_baseline_per_model(tmp_path):
    from types import SimpleNamespace

    from neonb.runs import robustness_runs
    from tests.tiny_model import TINY

    manifest = pd.DataFrame(
        {
            "participant_id": [f"p{i}" for i in range(5)],
            "session_id": "1",
            "scan_age": [30.0, 34.0, 38.0, 40.0, 42.0],
        }
    )
    cohort = SimpleNamespace(manifest=manifest, records=lambda t: t.to_dict("records"))
    splits = manifest.assign(split=["train", "train", "train", "val", "test"])
    chapter = robustness_runs(
        cohort,
        splits,
        results_dir=tmp_path,
        seed=3,
        training={"learning_rate": 0.001},
        models={"t2w": {"channels": ["t2w"]}, "randomized": {"channels": ["t2w"], "synthesis": {}}},
        baseline_training=TINY,
        n_runs=2,
    )
    assert chapter.ids == ["t2w/run-0", "t2w/run-1", "randomized/run-0", "randomized/run-1"]
    run = chapter["randomized/run-1"]
    assert run.config.channels == ("t2w",) and run.config.model.in_channels == 1
    assert run.config.synthesis is not None and run.config.seed == 4
    assert chapter["t2w/run-0"].config.synthesis is None
    assert run.config.learning_rate == 0.001 and run.config.patch_size == (16, 16, 16)
    assert [need.run for need in run.needs] == ["run-0"]
    assert run.run_dir == tmp_path / "06_robustness" / "randomized" / "run-1"


def test_a_randomized_t2w_run_starts_from_the_baseline_and_records_its_settings(tmp_path):
    """A T1w+T2w baseline, then a domain-randomised T2w run started from its T2w filters."""
    import yaml

    from neonb import data
    from neonb.experiment import TrainingConfig, load_trained_run
    from neonb.runs import _train_from_baseline
    from tests.tiny_model import TINY, tiny_cohort, tiny_run

    manifest = data.read_manifest(tiny_cohort(tmp_path / "data", seed=2))
    baseline = tiny_run(manifest, tmp_path / "baseline")
    records = data.to_data_dicts(manifest)
    config = TrainingConfig.from_dict(
        {**TINY, "epochs": 1, "channels": ["t2w"], "synthesis": {"real_prob": 0.0}}
    )
    trained = _train_from_baseline(
        records[:3], records[3:], config, tmp_path / "randomized",
        baseline / "model_best.pt", ("t1w", "t2w"), False,
    )  # fmt: skip
    saved = yaml.safe_load((tmp_path / "randomized" / "config.yaml").read_text())
    assert saved["channels"] == ["t2w"] and saved["synthesis"]["real_prob"] == 0.0
    assert TrainingConfig.from_dict(saved) == config
    assert len(trained.log) == 1
    reloaded, reloaded_config = load_trained_run(tmp_path / "randomized")
    assert reloaded_config.synthesis == config.synthesis


def test_select_levels_keeps_clean_and_the_most_severe_rows(tmp_path):
    from neonb.errors import ConfigError

    shifted = pd.DataFrame(
        {
            "shift": ["none", "noise", "noise", "bias", "bias", "bias"],
            "level": [0, 1, 2, 1, 2, 3],
            "session_id": ["1", "1n1", "1n2", "1b1", "1b2", "1b3"],
        }
    )
    path = robustness.select_levels(shifted, "severe", tmp_path / "qc.tsv")
    kept = pd.read_csv(path, sep="\t", dtype=str)
    assert list(kept["session_id"]) == ["1", "1n2", "1b3"]
    every = pd.read_csv(robustness.select_levels(shifted, "all", tmp_path / "all.tsv"), sep="\t")
    assert len(every) == 6
    with pytest.raises(ConfigError, match="'all' or 'severe'"):
        robustness.select_levels(shifted, "worst", tmp_path / "x.tsv")
