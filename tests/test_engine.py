"""Tests of neonb.engine on a tiny DynUNet and a learnable toy task (8³ patches, CPU)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.data import Dataset
from monai.networks.nets import DynUNet
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from neonb.engine import (
    LOG_COLUMNS,
    fit,
    log_columns,
    make_loader,
    poly_scheduler,
    sgd_nesterov,
    training_network,
)
from neonb.errors import ConfigError, DataError
from neonb.inference import load_weights
from neonb.losses import SegmentationLoss
from neonb.models import HeadsAtOwnResolution

PATCH = 8
TIMING = ["epoch_time_s", "data_time_s"]


def _model(seed: int = 0) -> DynUNet:
    torch.manual_seed(seed)
    return DynUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=10,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 16],
        deep_supervision=True,
        deep_supr_num=1,
        res_block=True,
    )


def _samples(n: int, seed: int) -> list[dict]:
    """Toy task: the label is 1 where the first channel is positive, else 0."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        image = torch.randn(2, PATCH, PATCH, PATCH, generator=generator)
        label = (image[:1] > 0).float()
        samples.append(
            {"image": image, "label": label, "annotation": torch.ones_like(label), "id": f"s{i}"}
        )
    return samples


def _ce_head0(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """Stand-in loss: cross-entropy of the final deep-supervision head."""
    logits = outputs[:, 0] if outputs.ndim == 6 else outputs
    return F.cross_entropy(logits, batch["label"][:, 0].long())


def _fit(run_dir, epochs, *, loss_fn=_ce_head0, model_seed=0, adam=False, **kwargs):
    """Build model, optimiser, scheduler and loaders from scratch and call fit."""
    model = _model(model_seed)
    if adam:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        optimizer = sgd_nesterov(model.parameters())
    augment = Compose(
        [
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandGaussianNoised(keys=["image"], prob=0.5, std=0.1),
        ]
    )
    train = make_loader(Dataset(_samples(8, 1), augment), 2, shuffle=True, seed=0)
    val = make_loader(_samples(2, 2), 2)
    log = fit(
        model,
        loss_fn,
        optimizer,
        train,
        val,
        epochs=epochs,
        run_dir=run_dir,
        scheduler=poly_scheduler(optimizer, 3),
        device="cpu",
        progress=False,
        **kwargs,
    )
    return model, log


def test_two_epochs_lower_the_loss_and_write_the_run_folder(tmp_path):
    seeds = []
    config = {"patch_size": (8, 8, 8), "lr": 1e-2}
    _, log = _fit(tmp_path, 2, adam=True, config=config, seed=5, reseed=seeds.append)
    assert seeds == [5, 6]  # seed + epoch
    assert log["train_loss"].iloc[1] < log["train_loss"].iloc[0]
    assert list(log.columns) == log_columns()
    assert log_columns()[: len(LOG_COLUMNS)] == LOG_COLUMNS
    assert {"dice_CSF", "dice_Ventr", "dice_BG_outer", "dice_Hippoc"} <= set(log.columns)
    on_disk = pd.read_csv(tmp_path / "log.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, log, check_dtype=False)
    assert log["epoch"].tolist() == [1, 2]
    # the means skip classes absent from every patch (NaN); "no BG" leaves out labels 0 and 4
    dice = log[log_columns()[len(LOG_COLUMNS) :]]
    tissue = dice.drop(columns=["dice_BG_outer", "dice_BG_inner"])
    pd.testing.assert_series_equal(log["val_dice"], dice.mean(axis=1), check_names=False)
    pd.testing.assert_series_equal(log["val_dice_nobg"], tissue.mean(axis=1), check_names=False)
    assert set(p.name for p in tmp_path.iterdir()) == {
        "checkpoint.pt",
        "model_best.pt",
        "log.tsv",
        "config.yaml",
        "environment.json",
    }
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["patch_size"] == [8, 8, 8]
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["seed"] == 5
    assert {"neonb", "torch", "monai", "python", "cpu_count", "started"} <= set(env)


def test_checkpoints_load_with_weights_only(tmp_path):
    model, log = _fit(tmp_path, 1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert len(checkpoint["log"]) == 1
    assert checkpoint["best_epoch"] == 1
    assert checkpoint["best_score"] == pytest.approx(log["val_dice_nobg"].iloc[0])
    best = load_weights(_model(seed=5), tmp_path / "model_best.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(best.state_dict()[key], value)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, log_straight = _fit(tmp_path / "straight", 3)

    calls = {"n": 0}

    def crash_in_epoch_3(outputs, batch):
        calls["n"] += 1
        if calls["n"] > 8:  # 4 batches per epoch
            raise RuntimeError("simulated failure")
        return _ce_head0(outputs, batch)

    with pytest.raises(RuntimeError, match="simulated"):
        _fit(tmp_path / "resumed", 3, loss_fn=crash_in_epoch_3)
    # the failing batch left the checkpoint of epoch 2 in place, and no temporary file
    kept = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 2
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".")]

    resumed, log_resumed = _fit(tmp_path / "resumed", 3, model_seed=7)  # fresh everything
    assert len(log_resumed) == 3
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    pd.testing.assert_frame_equal(
        log_resumed.drop(columns=TIMING), log_straight.drop(columns=TIMING)
    )


def test_fit_after_the_last_epoch_only_returns_the_log(tmp_path):
    model, log = _fit(tmp_path, 1)
    again, log_again = _fit(tmp_path, 1, model_seed=3)
    pd.testing.assert_frame_equal(log, log_again)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_a_damaged_checkpoint_is_reported(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="checkpoint.pt"):
        _fit(tmp_path, 1)


def test_non_finite_loss_stops_training(tmp_path):
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        _fit(tmp_path, 1, loss_fn=lambda outputs, batch: outputs.sum() * float("nan"))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_validation_every_other_epoch(tmp_path):
    _, log = _fit(tmp_path, 3, val_every=2)
    assert log["val_dice"].isna().tolist() == [True, False, False]  # epochs 2 and 3 (last)


def test_poly_scheduler_follows_the_formula():
    optimizer = sgd_nesterov([torch.zeros(1, requires_grad=True)], lr=1e-2)
    scheduler = poly_scheduler(optimizer, 10)
    for epoch in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - epoch / 10) ** 0.9)
        optimizer.step()
        scheduler.step()


def test_sgd_nesterov_settings():
    group = sgd_nesterov([torch.zeros(1, requires_grad=True)]).param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (1e-2, 0.99, True)
    assert group["weight_decay"] == 3e-5


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"val_every": 0}, {"amp": "fp16"}])
def test_bad_arguments_raise(tmp_path, kwargs):
    kwargs = {"epochs": 1} | kwargs
    with pytest.raises(ConfigError):
        _fit(tmp_path, kwargs.pop("epochs"), **kwargs)


def test_channels_last_training_matches_the_default_layout(tmp_path):
    loss_fn = SegmentationLoss()
    default_model, default_log = _fit(
        tmp_path / "default",
        2,
        adam=True,
        loss_fn=loss_fn,
        channels_last=False,
        low_res_heads=False,
    )
    # the defaults: channels-last on the CPU, the heads at their own resolution
    fast_model, fast_log = _fit(tmp_path / "fast", 2, adam=True, loss_fn=loss_fn)
    conv = fast_model.input_block.conv1.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    assert not default_model.input_block.conv1.conv.weight.is_contiguous(
        memory_format=torch.channels_last_3d
    )
    for column in ("train_loss", "val_dice"):
        assert fast_log[column].tolist() == pytest.approx(default_log[column].tolist(), rel=1e-3)
    # the weights of a channels-last run load into a freshly built (default) model
    fresh = load_weights(_model(), tmp_path / "fast" / "model_best.pt")
    x = torch.randn(1, 2, PATCH, PATCH, PATCH)
    with torch.no_grad():
        expected = fast_model.eval()(x.contiguous(memory_format=torch.channels_last_3d))
        assert torch.allclose(fresh.eval()(x), expected, atol=1e-4)


def test_bad_channels_last_raises(tmp_path):
    with pytest.raises(ConfigError, match="channels_last"):
        _fit(tmp_path, 1, channels_last="yes")


def test_training_network_returns_heads_only_for_a_fused_loss_on_a_dynunet():
    model = _model()
    wrapped = training_network(model, SegmentationLoss(), True)
    assert isinstance(wrapped, HeadsAtOwnResolution) and wrapped.model is model
    assert training_network(model, SegmentationLoss(), False) is model
    assert training_network(model, SegmentationLoss(fused=False), True) is model
    assert training_network(model, torch.nn.MSELoss(), True) is model
    conv = torch.nn.Conv3d(2, 10, 1)
    assert training_network(conv, SegmentationLoss(), True) is conv

    class OwnForward(DynUNet):  # a subclass (the AgeU-Net) computes something else
        def forward(self, x):
            return super().forward(x)

    other = _model()
    other.__class__ = OwnForward
    assert training_network(other, SegmentationLoss(), True) is other
    with pytest.raises(ConfigError, match="low_res_heads"):
        training_network(model, SegmentationLoss(), "auto")
