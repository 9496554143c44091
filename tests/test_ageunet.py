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
    AgeHeadConfig,
    AgeUNetLoss,
    WindowAges,
    WindowFeatures,
    age_errors,
    aggregate_ages,
    alpha_at,
    build_ageunet,
    evaluate_with_age,
    head_ages,
    load_ageunet_run,
    load_volumes,
    segment_with_age,
    segmentation_logits,
    summary_table,
    train_ageunet,
    train_head_on_features,
    window_features,
)
from neonb.errors import ConfigError
from neonb.experiment import TrainingConfig, segmentation_loss, train_segmentation
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
    assert saved["age_mean"] == pytest.approx(np.mean(ages))
    assert saved["age_std"] == pytest.approx(np.std(ages))
    assert list(joint.log["epoch"]) == [1, 2]
    age_log = (tmp_path / "joint" / AGE_LOG_FILE).read_text().splitlines()
    assert age_log[0].split("\t")[:2] == ["epoch", "alpha"] and len(age_log) == 3

    per_class, ages = evaluate_with_age(joint.model, records[3:], config, out_dir=tmp_path / "p")
    assert per_class["label"].tolist() == list(range(NUM_CLASSES))
    assert per_class["dice"].dropna().between(0, 1).all()
    assert len(list((tmp_path / "p").glob("*_dseg.nii.gz"))) == 1
    volume = load_volumes(records[3:])[0]
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
