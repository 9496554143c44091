"""Tests of neonb.ageunet: the AgeU-Net model, its loss, test-time ages and run folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neonb import data
from neonb.ageunet import (
    AGE_HEAD_FILE,
    AGE_LOG_FILE,
    VERDICTS,
    AgeHeadConfig,
    AgeUNetLoss,
    WindowAges,
    WindowFeatures,
    age_errors,
    age_standardization,
    age_verdicts,
    aggregate_ages,
    alpha_at,
    build_ageunet,
    head_ages,
    load_ageunet_run,
    segment_with_age,
    segmentation_logits,
    summary_table,
    train_ageunet,
    train_head_on_features,
    window_features,
)
from neonb.errors import ConfigError
from neonb.experiment import (
    TrainingConfig,
    evaluate,
    prepare_volumes,
    segmentation_loss,
    train_segmentation,
)
from neonb.inference import segment
from neonb.labels import NUM_CLASSES
from neonb.models import ModelConfig, build_model
from neonb.phantom import write_cohort

TINY_MODEL = ModelConfig(strides=(1, 2, 2), filters=(4, 8, 16), deep_supr_num=1)
TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 2,
    "batch_size": 2,
    "samples_per_volume": 2,
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "model": TINY_MODEL.to_dict(),
}


def _net(head: AgeHeadConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_ageunet(TINY_MODEL, head or AgeHeadConfig(), age_mean=38.0, age_std=4.0)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(2, 2, 16, 16, 16, generator=generator),
        "label": torch.randint(0, NUM_CLASSES, (2, 1, 16, 16, 16), generator=generator).float(),
        "scan_age": torch.tensor([30.0, 42.0], dtype=torch.float64),
    }


@pytest.mark.parametrize(
    ("reduction", "train", "seg_shape"),
    [
        ("conv", True, (2, 2, NUM_CLASSES, 16, 16, 16)),
        ("conv", False, (2, NUM_CLASSES, 16, 16, 16)),
        ("avgpool", True, (2, 2, NUM_CLASSES, 16, 16, 16)),
        ("maxpool", False, (2, NUM_CLASSES, 16, 16, 16)),
    ],
)
def test_output_shapes(reduction, train, seg_shape):
    net = _net(AgeHeadConfig(reduction=reduction)).train(train)
    out = net(torch.zeros(2, 2, 16, 16, 16))
    assert tuple(out["segmentation"].shape) == seg_shape
    assert tuple(out["age"].shape) == (2,)
    assert tuple(segmentation_logits(out).shape) == (2, NUM_CLASSES, 16, 16, 16)


def test_segmentation_path_is_the_baselines():
    baseline = build_model(TINY_MODEL).eval()
    net = _net().eval()
    missing, unexpected = net.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("age_head", "age_")) for k in missing)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x)["segmentation"], baseline(x))


def test_age_gradients_reach_head_and_encoder_but_not_decoder():
    net = _net().train()
    loss_fn = AgeUNetLoss(segmentation_loss(TrainingConfig.from_dict(TINY)), AgeHeadConfig())
    batch = _batch()
    out = net(batch["image"])
    # the age term alone: its gradient flows through the encoder into the head only
    torch.mean((out["age"] - batch["scan_age"].float()) ** 2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head_parameters())
    assert net.input_block.conv1.conv.weight.grad.abs().sum() > 0
    assert net.bottleneck.conv1.conv.weight.grad.abs().sum() > 0
    assert net.output_block.conv.conv.weight.grad is None
    # the full loss reaches both
    net.zero_grad(set_to_none=True)
    loss_fn(net(batch["image"]), batch).backward()
    assert net.output_block.conv.conv.weight.grad.abs().sum() > 0
    assert next(net.head_parameters()).grad.abs().sum() > 0


def test_alpha_zero_gives_the_baseline_segmentation_loss():
    config = TrainingConfig.from_dict(TINY)
    net, batch = _net().train(), _batch()
    out = net(batch["image"])
    zero = AgeUNetLoss(segmentation_loss(config), AgeHeadConfig(alpha=0.0), epochs=2)
    baseline = segmentation_loss(config)(out["segmentation"], batch)
    assert torch.equal(zero(out, batch), baseline)
    paper = AgeUNetLoss(segmentation_loss(config), AgeHeadConfig(alpha=1e-2), age_std=4.0)
    expected = baseline + 1e-2 * torch.mean(((out["age"] - batch["scan_age"].float()) / 4.0) ** 2)
    assert torch.allclose(paper(out, batch), expected)


def test_the_papers_weighting_is_the_mse_in_weeks_squared_and_standardising_divides_it():
    config = TrainingConfig.from_dict(TINY)
    net, batch = _net().train(), _batch()
    out = net(batch["image"])
    segmentation = segmentation_loss(config)(out["segmentation"], batch)
    squared = torch.mean((out["age"] - batch["scan_age"].float()) ** 2)  # weeks²
    paper = AgeUNetLoss(segmentation_loss(config), AgeHeadConfig())  # the default: weeks²
    assert torch.allclose(paper(out, batch), segmentation + 1e-2 * squared)
    scaled = AgeUNetLoss(segmentation_loss(config), AgeHeadConfig(standardize=True), age_std=4.0)
    assert torch.allclose(scaled(out, batch), segmentation + 1e-2 * squared / 16.0)
    assert AgeHeadConfig().standardize is False
    assert age_standardization([30.0, 40.0], False) == (0.0, 1.0)
    assert age_standardization([30.0, 40.0], True) == (35.0, 5.0)
    with pytest.raises(ConfigError, match="two different training ages"):
        age_standardization([38.0, 38.0], True)


@pytest.mark.parametrize(("standardize", "mean", "std"), [(False, 0.0, 1.0), (True, 38.0, 4.0)])
def test_a_new_head_starts_at_the_mean_training_age(standardize, mean, std):
    torch.manual_seed(0)
    head = AgeHeadConfig(standardize=standardize)
    net = build_ageunet(TINY_MODEL, head, age_mean=mean, age_std=std).eval()
    x = torch.randn(3, 2, 16, 16, 16)
    with torch.no_grad():
        before = net(x)["age"]
        net.age_head.start_at((38.0 - mean) / std)
        after = net(x)["age"]
    if not standardize:
        assert before.abs().max() < 5.0  # a new head says about 0 weeks
    assert after.sub(38.0).abs().max() < 1.0  # 38 weeks plus a small input-dependent term
    shift = after - before  # the same for every input: the bias moved, nothing else
    assert torch.allclose(shift, shift[0].expand(3), atol=1e-4)


def test_alpha_schedule_and_set_epoch():
    head = AgeHeadConfig(alpha=0.1, alpha_schedule="linear", alpha_start=0.02)
    assert [round(alpha_at(e, 5, head), 4) for e in range(5)] == [0.02, 0.04, 0.06, 0.08, 0.1]
    assert alpha_at(3, 5, AgeHeadConfig(alpha=0.01)) == 0.01
    loss = AgeUNetLoss(segmentation_loss(TrainingConfig.from_dict(TINY)), head, epochs=5)
    loss.set_epoch(4)
    assert loss.alpha == pytest.approx(0.1)


def test_aggregation_arithmetic():
    assert aggregate_ages([30.0, 40.0], [1.0, 3.0]) == {"mean": 35.0, "foreground_weighted": 37.5}
    assert aggregate_ages([30.0, 40.0], [0.0, 0.0])["foreground_weighted"] == 35.0
    with pytest.raises(ConfigError, match="one weight per window"):
        aggregate_ages([30.0, 40.0], [1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        aggregate_ages([30.0], [-1.0])


def test_window_weights_are_tissue_probability():
    logits = torch.full((2, NUM_CLASSES, 2, 2, 2), -20.0)
    logits[0, 0] = 20.0  # window 0: all background
    logits[1, 3] = 20.0  # window 1: all tissue (label 3)
    windows = WindowAges()
    out = windows({"segmentation": logits, "age": torch.tensor([30.0, 40.0])})
    assert out is logits
    assert windows.weights == pytest.approx([0.0, 1.0])
    assert windows.aggregate() == pytest.approx({"mean": 35.0, "foreground_weighted": 40.0})


def test_segment_with_age_aggregates_every_window():
    net = _net().eval()
    with torch.no_grad():  # a head that always says 41 weeks: (0 * x + 0.75) * 4 + 38
        net.age_head.layers[-1].weight.zero_()
        net.age_head.layers[-1].bias.fill_(0.75)
    image = torch.randn(2, 20, 30, 16)
    labels, ages = segment_with_age(net, image, patch_size=(16, 16, 16), overlap=0.0, device="cpu")
    assert labels.shape == (20, 30, 16) and labels.dtype == np.uint8
    assert ages == pytest.approx({"mean": 41.0, "foreground_weighted": 41.0})


def test_window_features_are_the_features_the_head_reads_at_test_time():
    net = _net().eval()
    image = torch.randn(2, 20, 30, 18)
    image[:, :3] = 0  # outside the foreground box
    seen = []
    handle = net.bottleneck.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    segment_with_age(net, image, patch_size=(16, 16, 16), overlap=0.25, device="cpu")
    handle.remove()
    cached = window_features(
        net, image, patch_size=(16, 16, 16), overlap=0.25, device="cpu", sw_batch_size=3
    )
    assert cached.shape == (len(seen), 16, 4, 4, 4) and len(seen) > 1
    assert torch.allclose(cached, torch.cat(seen), atol=1e-5)
    # the head on the cached features gives the window ages segment_with_age aggregates
    windows = WindowAges()
    segment(net, image, patch_size=(16, 16, 16), overlap=0.25, device="cpu",
            segmentation_logits=windows)  # fmt: skip
    one = WindowFeatures(cached, torch.full((len(cached),), 40.0), torch.zeros(len(cached)))
    window_ages, volume_ages = head_ages(net, one)
    assert window_ages == pytest.approx(windows.ages, abs=1e-4)
    assert volume_ages == pytest.approx([np.mean(windows.ages)], abs=1e-4)


def _linear_problem(n: int, seed: int) -> WindowFeatures:
    """Windows whose age is a linear function of their channel means, one per volume."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 16, 2, 2, 2, generator=generator)
    ages = 38.0 + 3.0 * features.mean(dim=(2, 3, 4))[:, :2] @ torch.tensor([2.0, -1.0])
    return WindowFeatures(features, ages, torch.arange(n))


def test_head_training_learns_a_linear_target_and_leaves_the_unet_alone():
    train, val = _linear_problem(480, seed=1), _linear_problem(120, seed=2)
    head = AgeHeadConfig(reduction="avgpool", hidden=0)
    net = build_ageunet(TINY_MODEL, head, age_mean=float(train.ages.mean()),
                        age_std=float(train.ages.std()))  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("age_")}
    log = train_head_on_features(net, train, val, epochs=60, learning_rate=0.03, batch_size=32)
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert list(log["epoch"]) == list(range(1, 61))
    mean_mae = float((val.ages - train.ages.mean()).abs().mean())  # weeks
    _, predicted = head_ages(net, val)
    mae = float(np.abs(predicted - val.ages.numpy()).mean())
    assert mae < 0.1 * mean_mae
    # the head kept is that of the epoch with the lowest validation MAE
    assert mae == pytest.approx(log["val_age_mae_w"].min(), rel=1e-4)
    assert log["val_age_mae_w"].iloc[0] > 0.3 * mean_mae  # it did have to learn


def test_age_errors_against_the_mean_predictor():
    import pandas as pd

    ages = pd.DataFrame(
        {"scan_age": [30.0, 40.0], "age_mean": [32.0, 40.0], "age_foreground_weighted": [30, 41]}
    )
    table = age_errors(ages, baseline_age=35.0)
    assert table.loc["mean", "MAE (weeks)"] == 1.0
    assert table.loc["foreground_weighted", "MSE (weeks²)"] == 0.5
    assert table.loc["mean predictor", "MAE (weeks)"] == 5.0


def test_summary_table_shows_a_constant_head():
    import pandas as pd

    ids = {"participant_id": ["a", "b"], "session_id": ["1", "1"]}
    ages = pd.DataFrame(
        {
            **ids,
            "scan_age": [30.0, 40.0],
            "age_mean": [35.0, 35.0],
            "age_foreground_weighted": [35.0, 35.0],
            "variant": "constant",
        }
    )
    rows = pd.DataFrame(
        {
            "participant_id": ["a"] * 2 + ["b"] * 2,
            "session_id": "1",
            "is_background": [False, True] * 2,
            "dice": [0.8, 1.0, 0.6, 1.0],
            "hd95_mm": float("nan"),
            "variant": "constant",
        }
    )
    table = summary_table(rows, ages, rows.drop(columns="variant"), mean_age=35.0)
    assert list(table.index) == ["baseline", "AgeU-Net: constant", "mean predictor"]
    assert table.loc["baseline", "test Dice (no BG)"] == pytest.approx(0.7)
    assert table.loc["AgeU-Net: constant", "age MAE (weeks)"] == 5.0
    assert table.loc["AgeU-Net: constant", "predicted SD (weeks)"] == 0.0
    assert np.isnan(table.loc["AgeU-Net: constant", "r (predicted, true)"])
    assert table.loc["mean predictor", "age MSE (weeks²)"] == 25.0


TRUE_AGES = np.array([29.0, 31.0, 33.0, 35.0, 36.0, 37.0, 38.0, 39.0, 40.0, 41.0, 42.0, 44.0])


def _ages(variant: str, predicted, run: int = 0, truth=TRUE_AGES) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "participant_id": [f"p{i}" for i in range(len(truth))],
            "session_id": "1",
            "scan_age": truth,
            "age_mean": predicted,
            "age_foreground_weighted": predicted,
            "variant": variant,
            "run": run,
        }
    )


def test_age_verdicts_state_the_rule_that_decided_each():
    mean_age = 38.0
    offsets = np.array([0.3, -0.2, 0.4, -0.5, 0.1, -0.3, 0.2, -0.4, 0.5, -0.1, 0.3, -0.2])
    ages = pd.concat(
        [
            _ages("flat", mean_age + 0.05 * offsets),  # the mean age, give or take
            _ages("good", TRUE_AGES + offsets),  # within half a week of every true age
            _ages("reversed", 2 * mean_age - TRUE_AGES),  # spread, but the wrong way round
            # tracks the truth: a lower MAE than the mean predictor on only 3 sessions
            _ages("few", [31.0, 38.5, 41.0], truth=np.array([30.0, 38.0, 43.0])),
        ]
    )
    table = age_verdicts(ages, mean_age).set_index("variant")
    assert list(table.index) == ["flat", "good", "reversed", "few"]
    assert set(table["verdict"]) <= set(VERDICTS)
    true_sd = TRUE_AGES.std()
    assert table.loc["good", "true SD (weeks)"] == pytest.approx(true_sd)
    assert table.loc["flat", "verdict"] == "mean age learned"
    assert table.loc["flat", "predicted SD (weeks)"] < 0.25 * true_sd
    assert "< 0.25 × true SD" in table.loc["flat", "rule"]
    assert table.loc["good", "verdict"] == "beats the mean predictor"
    mean_mae = np.abs(TRUE_AGES - mean_age).mean()
    assert table.loc["good", "mean predictor MAE (weeks)"] == pytest.approx(mean_mae)
    assert table.loc["good", "MAE (weeks)"] == pytest.approx(np.abs(offsets).mean())
    from scipy.stats import wilcoxon

    expected_p = wilcoxon(np.abs(offsets), np.abs(TRUE_AGES - mean_age)).pvalue
    assert table.loc["good", "p (Wilcoxon)"] == pytest.approx(expected_p)
    assert "Wilcoxon signed-rank on 12 paired sessions" in table.loc["good", "rule"]
    assert table.loc["good", "r (predicted, true)"] > 0.99
    assert table.loc["reversed", "verdict"] == "worse than the mean predictor"
    # a lower point MAE is not enough with 3 sessions (the smallest two-sided p is 0.25)
    few = table.loc["few"]
    assert few["MAE (weeks)"] < few["mean predictor MAE (weeks)"]
    assert few["verdict"] == "not shown to beat the mean predictor" and few["p (Wilcoxon)"] >= 0.25
    assert few["sessions"] == 3


def test_age_verdicts_pool_the_runs_of_a_variant():
    mean_age = 38.0
    offsets = np.array([0.5, -0.5] * 6)
    ages = pd.concat(
        [
            _ages("twice", TRUE_AGES + offsets, run=0),
            _ages("twice", TRUE_AGES - 2 * offsets, run=1),
        ]
    )
    row = age_verdicts(ages, mean_age).iloc[0]
    assert (row["runs"], row["sessions"]) == (2, 12)
    assert row["MAE (weeks)"] == pytest.approx(0.75)  # the mean of |0.5| and |1.0|
    assert row["verdict"] == "beats the mean predictor"
    one_run = age_verdicts(_ages("once", TRUE_AGES + offsets).drop(columns="run"), mean_age)
    assert one_run.loc[0, "runs"] == 1 and one_run.loc[0, "MAE (weeks)"] == pytest.approx(0.5)
    other = _ages("twice", TRUE_AGES, run=1).assign(
        participant_id=lambda t: t["participant_id"] + "x"
    )
    with pytest.raises(ConfigError, match="different test sessions"):
        age_verdicts(pd.concat([_ages("twice", TRUE_AGES), other]), mean_age)
    with pytest.raises(ConfigError, match="constant_fraction and alpha"):
        age_verdicts(ages, mean_age, alpha=1.5)


def test_summary_table_gives_the_mean_of_the_runs_and_each_run():
    ages = pd.concat(
        [_ages("paper", TRUE_AGES + 1.0, run=0), _ages("paper", TRUE_AGES - 3.0, run=1)]
    )
    rows = pd.DataFrame(
        {
            "participant_id": np.repeat(ages["participant_id"].to_numpy(), 2),
            "session_id": "1",
            "is_background": [False, True] * len(ages),
            "dice": np.where(np.arange(2 * len(ages)) < 2 * len(TRUE_AGES), 0.8, 0.6),
            "hd95_mm": np.nan,
            "variant": "paper",
            "run": np.repeat(ages["run"].to_numpy(), 2),
        }
    )
    rows.loc[rows["is_background"], "dice"] = 1.0
    table = summary_table(rows, ages, rows.drop(columns=["variant", "run"]), mean_age=38.0)
    assert list(table.index) == [
        "baseline",
        "AgeU-Net: paper",
        "AgeU-Net: paper, run 0",
        "AgeU-Net: paper, run 1",
        "mean predictor",
    ]
    assert table.loc["AgeU-Net: paper", "runs"] == 2
    assert table.loc["AgeU-Net: paper, run 0", "age MAE (weeks)"] == pytest.approx(1.0)
    assert table.loc["AgeU-Net: paper, run 1", "age MAE (weeks)"] == pytest.approx(3.0)
    assert table.loc["AgeU-Net: paper", "age MAE (weeks)"] == pytest.approx(2.0)
    assert table.loc["AgeU-Net: paper", "age MSE (weeks²)"] == pytest.approx(5.0)
    assert table.loc["AgeU-Net: paper", "test Dice (no BG)"] == pytest.approx(0.7)
    assert table.loc["AgeU-Net: paper, run 1", "test Dice (no BG)"] == pytest.approx(0.6)
    expected = np.abs(TRUE_AGES - 38.0).mean()
    assert table.loc["mean predictor", "age MAE (weeks)"] == pytest.approx(expected)


def test_ageunet_runs_define_n_runs_seeded_replicates_per_variant(tmp_path):
    from types import SimpleNamespace

    from neonb.runs import ageunet_runs

    manifest = pd.DataFrame(
        {
            "participant_id": [f"p{i}" for i in range(5)],
            "session_id": "1",
            "scan_age": [30.0, 34.0, 38.0, 40.0, 42.0],
        }
    )
    cohort = SimpleNamespace(manifest=manifest, records=lambda t: t.to_dict("records"))
    splits = manifest.assign(split=["train", "train", "train", "val", "test"])
    variants = {"paper": {}, "staged": {"head": {"staged": True, "standardize": True}}}

    def define(n_runs):
        return ageunet_runs(
            cohort,
            splits,
            results_dir=tmp_path,
            seed=7,
            training={"learning_rate": 0.001},
            head={"alpha": 0.01},
            variants=variants,
            baseline_training=TINY,
            n_runs=n_runs,
        )

    chapter = define(2)
    assert chapter.ids == ["paper/run-0", "paper/run-1", "staged/run-0", "staged/run-1"]
    assert [chapter.settings[i][0].seed for i in chapter.ids] == [7, 8, 7, 8]
    assert chapter.replicates["staged/run-1"] == ("staged", 1)
    assert chapter["paper/run-1"].run_dir == tmp_path / "02_ageunet" / "paper" / "run-1"
    assert chapter.groups()["staged"] == [chapter["staged/run-0"], chapter["staged/run-1"]]
    assert (
        chapter.settings["staged/run-0"][1].standardize
        and not chapter.settings["paper/run-0"][1].standardize
    )
    assert chapter["staged/run-1"].head_only and not chapter["paper/run-1"].head_only
    assert define(1).ids == ["paper/run-0", "staged/run-0"]
    with pytest.raises(ConfigError, match="n_runs must be a whole number"):
        define(0)


def test_head_config_round_trips_and_rejects_bad_values():
    head = AgeHeadConfig(alpha_schedule="linear", head_learning_rate=0.01)
    assert AgeHeadConfig.from_dict(head.to_dict()) == head
    with pytest.raises(ConfigError, match="unknown age-head setting"):
        AgeHeadConfig.from_dict({"alfa": 0.1})
    with pytest.raises(ConfigError, match="reduction"):
        AgeHeadConfig(reduction="flatten")
    with pytest.raises(ConfigError, match="alpha_schedule"):
        AgeHeadConfig(alpha_schedule="cosine")
    with pytest.raises(ConfigError, match="alpha"):
        AgeHeadConfig(alpha=-1.0)
    with pytest.raises(ConfigError, match="conv_layers"):
        AgeHeadConfig(conv_layers=0)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_cohort(
        tmp_path_factory.mktemp("cohort"), n=4, seed=1, voxel_size=6.0, progress=False
    )
    return data.to_data_dicts(data.read_manifest(root, progress=False))


def test_joint_and_staged_runs_reload_from_their_folders(records, tmp_path):
    config = TrainingConfig.from_dict(TINY)
    baseline = train_segmentation(
        records[:3], records[3:], config, tmp_path / "base", progress=False
    )

    joint = train_ageunet(
        records[:3], records[3:], config, AgeHeadConfig(), tmp_path / "joint", progress=False
    )
    saved = yaml.safe_load((tmp_path / "joint" / AGE_HEAD_FILE).read_text())
    ages = [r["scan_age"] for r in records[:3]]
    # the paper's weighting: ages in weeks, no standardisation; the head starts at the mean
    assert (saved["age_mean"], saved["age_std"]) == (0.0, 1.0)
    assert saved["head_starts_at_weeks"] == pytest.approx(np.mean(ages))
    assert saved["head"]["standardize"] is False
    assert list(joint.log["epoch"]) == [1, 2]
    age_log = (tmp_path / "joint" / AGE_LOG_FILE).read_text().splitlines()
    assert age_log[0].split("\t")[:2] == ["epoch", "alpha"] and len(age_log) == 3

    volumes = prepare_volumes(records[3:])
    per_class, ages = evaluate(
        joint.model, volumes, config, window_hook=WindowAges, out_dir=tmp_path / "p"
    )
    assert per_class["label"].tolist() == list(range(NUM_CLASSES))
    assert per_class["dice"].dropna().between(0, 1).all()
    assert len(list((tmp_path / "p").glob("*_dseg.nii.gz"))) == 1
    volume = volumes[0]
    _, expected = segment_with_age(
        joint.model, volume["image"], patch_size=(16, 16, 16), overlap=config.overlap
    )
    assert ages.loc[0, "age_mean"] == pytest.approx(expected["mean"])
    assert ages.loc[0, "scan_age"] == records[3]["scan_age"] and ages.loc[0, "n_windows"] >= 1

    loaded, loaded_config, head = load_ageunet_run(tmp_path / "joint")
    assert loaded_config == config and head == AgeHeadConfig()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        a, b = joint.model.eval()(x), loaded.model(x)
    assert torch.equal(a["age"], b["age"]) and torch.equal(a["segmentation"], b["segmentation"])

    staged = train_ageunet(
        records[:3],
        records[3:],
        config,
        AgeHeadConfig(staged=True),
        tmp_path / "staged",
        init_weights=tmp_path / "base" / "model_best.pt",
        progress=False,
    )
    with torch.no_grad():  # the segmentation path is the frozen baseline's
        assert torch.equal(staged.model(x)["segmentation"], baseline.model(x))
    reloaded, _, _ = load_ageunet_run(tmp_path / "staged")
    with torch.no_grad():  # the head kept, with the baseline's segmentation path
        assert torch.equal(reloaded.model(x)["age"], staged.model(x)["age"])
        assert torch.equal(reloaded.model(x)["segmentation"], baseline.model(x))
    age_log = pd.read_csv(tmp_path / "staged" / AGE_LOG_FILE, sep="\t")
    assert list(age_log["epoch"]) == [1, 2] and age_log["val_age_mae_w"].notna().all()
    assert list(staged.log["epoch"]) == [1, 2]
    assert staged.log["val_dice_nobg"].between(0, 1).all()  # the frozen network's
    again = train_ageunet(
        records[:3],
        records[3:],
        config,
        AgeHeadConfig(staged=True),
        tmp_path / "staged",
        init_weights=tmp_path / "base" / "model_best.pt",
        progress=False,
    )  # a finished run is reloaded, not retrained
    assert again.log.equals(reloaded.log)
    with pytest.raises(ConfigError, match="init_weights"):
        train_ageunet(records[:3], records[3:], config, AgeHeadConfig(staged=True), tmp_path / "x")
