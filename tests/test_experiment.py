"""Tests of neonb.experiment: a whole (tiny) train-and-evaluate run on the phantom."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from neonb import data
from neonb.errors import ConfigError, DataError
from neonb.experiment import (
    TrainingConfig,
    evaluate,
    load_trained_run,
    prediction_filename,
    train_segmentation,
)
from neonb.labels import NUM_CLASSES
from neonb.phantom import write_cohort

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


def test_train_then_evaluate_writes_run_and_predictions(records, tmp_path):
    config = TrainingConfig.from_dict(TINY)
    run = train_segmentation(records[:3], records[3:], config, tmp_path / "run", progress=False)
    assert list(run.log["epoch"]) == [1, 2]
    assert (tmp_path / "run" / "model_best.pt").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not run.model.training

    table = evaluate(run.model, records[3:], config, out_dir=tmp_path / "pred", progress=False)
    assert len(table) == NUM_CLASSES
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

    # load_trained_run rebuilds the same network from the folder alone
    loaded, loaded_config = load_trained_run(tmp_path / "run")
    assert loaded_config == config
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
