"""Tests of neonb.experiment: a whole (tiny) train-and-evaluate run on the phantom."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from neonb import data
from neonb.ageunet import AgeHeadConfig, WindowAges, build_ageunet, segment_with_age
from neonb.errors import ConfigError, DataError
from neonb.experiment import (
    VAL_SESSIONS_FILE,
    TrainingConfig,
    evaluate,
    load_trained_run,
    prediction_filename,
    prepare_volumes,
    train_segmentation,
    training_loader,
)
from neonb.inference import segment
from neonb.labels import NUM_CLASSES
from neonb.metrics import dice_per_class, evaluate_case
from neonb.models import build_model
from neonb.phantom import write_cohort
from neonb.transforms import eval_transforms

TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 2,
    "batch_size": 2,
    "samples_per_volume": 2,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_cohort(
        tmp_path_factory.mktemp("cohort"), n=4, seed=1, voxel_size=6.0, progress=False
    )
    return data.to_data_dicts(data.read_manifest(root, progress=False))


def test_config_round_trips_and_rejects_unknown_settings():
    config = TrainingConfig.from_dict(TINY)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert config.patch_size == (16, 16, 16)
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainingConfig.from_dict({**TINY, "epoch": 3})
    with pytest.raises(ConfigError, match="overlap"):
        TrainingConfig.from_dict({**TINY, "overlap": 1.0})


def test_channels_choose_the_inputs_and_the_networks_in_channels():
    assert TrainingConfig.from_dict(TINY).channels == ("t1w", "t2w")
    for channels in (["t2w"], ["t1w"], ["t1w", "t2w"]):
        config = TrainingConfig.from_dict({**TINY, "channels": channels})
        assert config.channels == tuple(channels)
        assert config.model.in_channels == len(channels)  # follows channels when not given
        assert config.to_dict()["channels"] == channels  # a list, for YAML
        assert TrainingConfig.from_dict(config.to_dict()) == config
    agreeing = {**TINY, "channels": ["t2w"], "model": {**TINY["model"], "in_channels": 1}}
    assert TrainingConfig.from_dict(agreeing).model.in_channels == 1
    for bad in (["t2w", "t1w"], ["flair"], [], "t2w", ["t2w", "t2w"]):
        with pytest.raises(ConfigError, match=r"channels must be one of .*but found"):
            TrainingConfig.from_dict({**TINY, "channels": bad})
    contradicting = {**TINY, "channels": ["t2w"], "model": {**TINY["model"], "in_channels": 2}}
    with pytest.raises(ConfigError, match=r"model.in_channels is 2 but channels \['t2w'\]"):
        TrainingConfig.from_dict(contradicting)
    with pytest.raises(ConfigError, match="model.in_channels is 2"):
        TrainingConfig.from_dict(TINY).replace(channels=("t1w",))


def test_a_session_needs_only_the_images_of_the_runs_channels(records, tmp_path):
    config = TrainingConfig.from_dict({**TINY, "channels": ["t2w"], "cache_dir": str(tmp_path)})
    without_t1w = [{k: v for k, v in r.items() if k != "t1w"} for r in records[:2]]
    batch = next(iter(training_loader(without_t1w, config)))
    assert batch["image"].shape[1] == 1
    two = TrainingConfig.from_dict({**TINY, "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"training session sub-\S+ ses-\S+ lacks \['t1w'\]"):
        training_loader(without_t1w, two)


def test_train_then_evaluate_writes_run_and_predictions(records, tmp_path):
    config = TrainingConfig.from_dict(TINY)
    run = train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    assert list(run.log["epoch"]) == [1, 2]
    assert (tmp_path / "run" / "model_best.pt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not run.model.training

    scores = evaluate(
        run.model, prepare_volumes(records[3:]), config, hd95=True, out_dir=tmp_path / "pred"
    )
    table = scores.per_class
    assert len(table) == NUM_CLASSES and len(scores.per_volume) == 1
    assert table["label"].tolist() == list(range(NUM_CLASSES))
    assert table["dice"].dropna().between(0, 1).all()
    assert table["dice"].notna().sum() >= 2  # both background classes are always present
    record = records[3]
    written = nib.load(
        tmp_path / "pred" / prediction_filename(record["participant_id"], record["session_id"])
    )
    reference = nib.load(record["t2w"])
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine)
    assert written.get_data_dtype() == np.uint8

    t1w_only = prepare_volumes(records[3:], channels=["t1w"])[0]
    assert t1w_only["reference"] == record["t1w"] and t1w_only["image"].shape[0] == 1

    # load_trained_run rebuilds the same network from the folder alone
    loaded, loaded_config = load_trained_run(tmp_path / "run")
    assert loaded_config == config
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["channels"] == ["t1w", "t2w"]
    validation = pd.read_csv(tmp_path / "run" / VAL_SESSIONS_FILE, sep="\t", dtype=str)
    assert validation["t2w"].tolist() == [str(Path(record["t2w"]).resolve())]
    assert validation["dseg"].tolist() == [str(Path(record["label"]).resolve())]
    assert loaded.log.equals(run.log)
    for a, b in zip(
        loaded.model.state_dict().values(), run.model.state_dict().values(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy())

    # a finished run folder is reloaded, not trained again
    again = train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    assert again.log.equals(run.log)
    for a, b in zip(
        again.model.state_dict().values(), run.model.state_dict().values(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(("name", "expected"), [("sgd", "SGD"), ("adamw", "AdamW")])
def test_train_segmentation_uses_the_configured_optimizer(
    records, tmp_path, monkeypatch, name, expected
):
    seen = {}

    def fake_fit(model, loss_fn, optimizer, *args, **kwargs):
        seen["optimizer"] = optimizer
        raise RuntimeError("stop before training")

    monkeypatch.setattr("neonb.experiment.fit", fake_fit)
    config = TrainingConfig.from_dict({**TINY, "optimizer": name, "learning_rate": 0.02})
    with pytest.raises(RuntimeError, match="stop before training"):
        train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    assert type(seen["optimizer"]).__name__ == expected
    assert seen["optimizer"].param_groups[0]["lr"] == 0.02
    if name == "sgd":
        assert seen["optimizer"].param_groups[0]["nesterov"]


def test_load_trained_run_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"config\.yaml.*01_pipeline"):
        load_trained_run(tmp_path / "run-0")


def test_evaluate_matches_the_scores_computed_directly(records, tmp_path):
    """Dice, HD95, written labels and ages equal segment() + neonb.metrics / MONAI by hand."""
    config = TrainingConfig.from_dict({**TINY, "device": "cpu"})
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    volumes = prepare_volumes(records[:2])
    scores = evaluate(model, volumes, config, hd95=True, out_dir=tmp_path / "pred")
    window = {"patch_size": config.patch_size, "overlap": config.overlap, "device": "cpu"}
    expected = []
    for record in records[:2]:
        sample = eval_transforms(crop=False)(dict(record))  # what the old evaluate() did
        label = np.asarray(sample["label"][0], dtype=np.uint8)
        predicted = segment(model, sample["image"], **window)
        spacing = nib.load(record["t2w"]).header.get_zooms()[:3]
        ids = {k: record[k] for k in ("participant_id", "session_id", "scan_age")}
        expected.append(evaluate_case(predicted, label, spacing, ids))
        written = prediction_filename(record["participant_id"], record["session_id"])
        assert np.array_equal(nib.load(tmp_path / "pred" / written).get_fdata(), predicted)
        monai_dice = compute_dice(
            one_hot(torch.as_tensor(predicted)[None, None].long(), NUM_CLASSES),
            one_hot(torch.as_tensor(label)[None, None].long(), NUM_CLASSES),
            include_background=True,
            ignore_empty=False,
        )[0].numpy()
        present = (np.bincount(predicted.ravel(), minlength=NUM_CLASSES) > 0) | (
            np.bincount(label.ravel(), minlength=NUM_CLASSES) > 0
        )
        assert np.isnan(expected[-1]["dice"][~present]).all()
        np.testing.assert_allclose(expected[-1]["dice"][present], monai_dice[present], rtol=1e-6)
    got = scores.per_class.drop(columns="inference_s")
    pd.testing.assert_frame_equal(got, pd.concat(expected, ignore_index=True), check_exact=True)
    assert got["hd95_mm"].notna().any() and got["dice"].between(0.01, 0.99).any()
    assert (scores.per_class["inference_s"] > 0).all()
    assert list(scores.per_volume.columns) == [
        "participant_id", "session_id", "scan_age", "inference_s"
    ]  # fmt: skip

    # Dice only: the same Dice columns, no distances or volumes
    dice_only = evaluate(model, volumes, config).per_class
    assert "hd95_mm" not in dice_only
    pd.testing.assert_frame_equal(
        dice_only.drop(columns="inference_s"), got[dice_only.columns[:-1]]
    )

    # the AgeU-Net's ages through the window hook: as segment_with_age gives them
    torch.manual_seed(1)
    net = build_ageunet(config.model, AgeHeadConfig(), age_mean=38.0, age_std=3.5).eval()
    per_class, per_volume = evaluate(net, volumes, config, window_hook=WindowAges)
    for i, volume in enumerate(volumes):
        labels, age = segment_with_age(net, volume["image"], **window)
        rows = per_class.iloc[i * NUM_CLASSES : (i + 1) * NUM_CLASSES]
        np.testing.assert_array_equal(rows["dice"], dice_per_class(labels, volume["label"]))
        # windows go through the network in batches here, one at a time there: float rounding
        assert per_volume.loc[i, "age_mean"] == pytest.approx(age["mean"], rel=1e-9)
        assert per_volume.loc[i, "age_foreground_weighted"] == pytest.approx(
            age["foreground_weighted"], rel=1e-9
        )
        assert per_volume.loc[i, "n_windows"] >= 1
    assert list(per_volume.columns) == [
        "participant_id", "session_id", "scan_age",
        "age_mean", "age_foreground_weighted", "n_windows", "inference_s",
    ]  # fmt: skip


def test_evaluate_refuses_what_it_cannot_score(records):
    config = TrainingConfig.from_dict({**TINY, "device": "cpu"})
    model = build_model(config.model)
    with pytest.raises(ConfigError, match="no evaluation volumes"):
        evaluate(model, [], config)
    with pytest.raises(ConfigError, match="no evaluation sessions"):
        prepare_volumes([])
    volume = prepare_volumes(records[:1])[0]
    without = {k: v for k, v in volume.items() if k not in ("t2w", "reference")}
    with pytest.raises(ConfigError, match=r"lacks \['reference'\].*prepare_volumes"):
        evaluate(model, [without], config, hd95=True)
    one_channel = prepare_volumes(records[:1], channels=["t2w"])[0]
    assert one_channel["image"].shape[0] == 1 and one_channel["reference"] == records[0]["t2w"]
    with pytest.raises(ConfigError, match="1 image channels but the network takes 2"):
        evaluate(model, [one_channel], config)
    with pytest.raises(ConfigError, match="window_hook or segmentation_logits"):
        evaluate(model, [volume], config, window_hook=WindowAges, segmentation_logits=lambda o: o)


def test_a_config_yaml_without_channels_reads_as_t1w_and_t2w(records, tmp_path):
    """A run folder written before runs recorded their channels."""
    config = TrainingConfig.from_dict({**TINY, "epochs": 1})
    train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(path.read_text())
    del old["channels"]
    path.write_text(yaml.safe_dump(old))
    _, loaded = load_trained_run(tmp_path / "run")
    assert loaded.channels == ("t1w", "t2w") and loaded == config


def test_val_every_validates_every_nth_epoch_and_the_last(tmp_path):
    """``TrainingConfig.val_every`` reaches the training loop: validation columns are filled
    only for validated epochs, and the best checkpoint is one of them."""
    from tiny_model import TINY, tiny_cohort

    from neonb import data
    from neonb.experiment import TrainingConfig, train_segmentation

    with pytest.raises(ConfigError, match="val_every must be a positive integer"):
        TrainingConfig.from_dict({**TINY, "val_every": 0})
    records = data.to_data_dicts(data.read_manifest(tiny_cohort(tmp_path, seed=4), progress=False))
    config = TrainingConfig.from_dict({**TINY, "epochs": 3, "val_every": 2})
    trained = train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    validated = trained.log["val_dice"].notna().tolist()
    assert validated == [False, True, True]
    assert TrainingConfig.from_dict(config.to_dict()).val_every == 2
