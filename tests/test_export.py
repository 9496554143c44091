"""Tests of neonb.export: the safetensors + JSON model folder, on a tiny trained run."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neonb import __version__, data
from neonb.cli import main
from neonb.errors import ConfigError, DataError
from neonb.experiment import TrainingConfig, load_trained_run, train_segmentation
from neonb.export import (
    METADATA_FILE,
    WEIGHTS_FILE,
    export_run,
    load_exported_model,
    training_grid,
)
from neonb.inference import segment
from neonb.phantom import write_cohort

TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 2,
    "batch_size": 2,
    "samples_per_volume": 1,
    "overlap": 0.25,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}


class _RunsCodeOnLoad:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(
        tmp_path_factory.mktemp("cohort"), n=3, seed=2, voxel_size=6.0, progress=False
    )


@pytest.fixture(scope="module")
def run_dir(cohort, tmp_path_factory):
    records = data.to_data_dicts(data.read_manifest(cohort, progress=False))
    run = tmp_path_factory.mktemp("run")
    train_segmentation(
        records[:2], records[2:], TrainingConfig.from_dict(TINY), run, progress=False
    )
    return run


def test_export_writes_weights_and_metadata(run_dir, cohort, tmp_path):
    out = export_run(run_dir, tmp_path / "model", data_root=cohort)
    assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["format"] == "neonb-model" and meta["neonb_version"] == __version__
    assert meta["architecture"] == "DynUNet" and meta["age_head"] is None
    assert meta["input_channels"] == ["t1w", "t2w"] and meta["input_images"] == "restore"
    assert meta["patch_size"] == [16, 16, 16] and meta["overlap"] == 0.25
    assert meta["voxel_size_mm"] == [6.0, 6.0, 6.0] and meta["orientation"] == "RAS"
    assert [row["index"] for row in meta["labels"]] == list(range(10))
    assert meta["labels"][5]["abbreviation"] == "Ventr."
    assert meta["normalisation"]["nonzero"] and meta["normalisation"]["channel_wise"]
    assert meta["training_data"]["dataset"]["neonb_phantom"]["voxel_size"] == 6.0
    log = pd.read_csv(run_dir / "log.tsv", sep="\t")
    best = log.loc[log["val_dice_nobg"].idxmax()]
    assert meta["metrics"]["best_epoch"] == int(best["epoch"])
    assert meta["metrics"]["val_dice_nobg"] == pytest.approx(best["val_dice_nobg"])
    assert meta["training_environment"]["seed"] == 0
    assert meta["training_config"]["model"]["filters"] == [4, 8, 16]


def test_a_batch_over_a_release_reads_the_kind_of_images_the_model_was_trained_on(
    run_dir, cohort, tmp_path
):
    from neonb.segmentation import read_batch

    plain = load_exported_model(
        export_run(run_dir, tmp_path / "plain", data_root=cohort, images="plain")
    )
    assert plain.images == "plain"
    restore = load_exported_model(export_run(run_dir, tmp_path / "restore", data_root=cohort))
    for model, ending in ((plain, "_T2w.nii.gz"), (restore, "_desc-restore_T2w.nii.gz")):
        table = read_batch(cohort, images=model.images)
        assert table["t2w"].str.endswith(ending).all()
        assert table["t2w"].str.contains("desc-restore").all() == (model.images == "restore")
    with pytest.raises(ConfigError, match="images must be one of"):
        export_run(run_dir, tmp_path / "x", data_root=cohort, images="raw")


def test_loaded_model_predicts_like_the_run(run_dir, cohort, tmp_path):
    out = export_run(run_dir, tmp_path / "model", data_root=cohort)
    exported = load_exported_model(out)
    trained, config = load_trained_run(run_dir)
    for (key, a), (key_b, b) in zip(
        exported.model.state_dict().items(), trained.model.state_dict().items(), strict=True
    ):
        assert key == key_b and torch.equal(a, b)
    assert not exported.model.training
    assert exported.channels == ("t1w", "t2w") and exported.patch_size == config.patch_size
    image = torch.randn(2, 18, 24, 24)
    kwargs = {"patch_size": config.patch_size, "overlap": 0.25, "device": "cpu"}
    assert np.array_equal(
        segment(exported.model, image, **kwargs), segment(trained.model, image, **kwargs)
    )


def test_grid_needs_data_root_or_explicit_values(run_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--data-root"):
        export_run(run_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # no QC calibration: the 6 mm sessions would be segmented at the stated 0.5 mm
    out = export_run(
        run_dir, tmp_path / "m", voxel_size=[0.5], orientation="las", calibrate_qc=False
    )
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["voxel_size_mm"] == [0.5, 0.5, 0.5] and meta["orientation"] == "LAS"
    assert meta["training_data"]["description"] == "not recorded"
    with pytest.raises(ConfigError, match="orientation"):
        export_run(run_dir, tmp_path / "m", voxel_size=1.0, orientation="RAR")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neonb export: error:") and "--data-root" in err and "\n" not in err


def test_training_grid_reads_the_cohort(cohort):
    grid = training_grid(cohort)
    assert grid == {
        "voxel_size_mm": [6.0, 6.0, 6.0],
        "orientation": "RAS",
        "n_sessions": 3,
        "voxel_size_range_mm": [6.0, 6.0],
    }


def test_cli_export(run_dir, cohort, tmp_path, capsys):
    out = tmp_path / "cli-model"
    args = ["export", str(run_dir), "--out", str(out), "--data-root", str(cohort)]
    assert main([*args, "--description", "tiny phantom"]) == 0
    assert "model exported to" in capsys.readouterr().out
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["training_data"]["description"] == "tiny phantom"
    assert meta["overlap"] == 0.25  # the run's


def test_the_model_folder_declares_the_overlap_given(run_dir, cohort, tmp_path, capsys):
    args = ["export", str(run_dir), "--data-root", str(cohort), "--no-calibrate-qc"]
    assert main([*args, "--out", str(tmp_path / "m"), "--overlap", "0"]) == 0
    assert load_exported_model(tmp_path / "m").overlap == 0.0
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, 1\), got 1"):
        export_run(run_dir, tmp_path / "bad", data_root=cohort, overlap=1.0)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_loading_never_unpickles(run_dir, cohort, tmp_path):
    out = export_run(run_dir, tmp_path / "model", data_root=cohort)
    marker = tmp_path / "code-was-run"
    torch.save({"weights": _RunsCodeOnLoad(marker)}, out / WEIGHTS_FILE)
    with pytest.raises(DataError, match="is not a safetensors weights file"):
        load_exported_model(out)
    assert not marker.exists()


def test_export_refuses_a_checkpoint_that_runs_code(run_dir, tmp_path):
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "run")
    marker = tmp_path / "code-was-run"
    torch.save({"model": _RunsCodeOnLoad(marker)}, run / "model_best.pt")
    with pytest.raises(DataError, match="model_best.pt"):
        export_run(run, tmp_path / "model", voxel_size=6.0, orientation="RAS")
    assert not marker.exists()
    assert not (tmp_path / "model").exists()


def test_bad_model_folders_are_named(run_dir, cohort, tmp_path):
    with pytest.raises(DataError, match="model folder not found"):
        load_exported_model(tmp_path / "nowhere")
    out = export_run(run_dir, tmp_path / "model", data_root=cohort)
    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99 is newer"):
        load_exported_model(out)
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match=f"{METADATA_FILE}: is not readable JSON"):
        load_exported_model(out)
    wider = {**meta, "model": {**meta["model"], "filters": [8, 16, 32]}}
    meta_path.write_text(json.dumps(wider))
    with pytest.raises(DataError, match="does not fit the network"):
        load_exported_model(out)
    swapped = {**meta, "input_channels": ["t2w", "t1w"]}  # not an order neonb stacks
    meta_path.write_text(json.dumps(swapped))
    with pytest.raises(DataError, match=r"'input_channels' must be \["):
        load_exported_model(out)
    meta_path.unlink()
    with pytest.raises(DataError, match="file not found"):
        load_exported_model(out)


def test_input_channels_come_from_the_run_or_for_an_old_run_from_the_network(
    run_dir, cohort, tmp_path
):
    old = tmp_path / "old-run"
    old.mkdir()
    for path in run_dir.iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert config.pop("channels") == ["t1w", "t2w"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    out = export_run(old, tmp_path / "model", data_root=cohort, calibrate_qc=False)
    assert json.loads((out / METADATA_FILE).read_text())["input_channels"] == ["t1w", "t2w"]
    meta = json.loads((out / METADATA_FILE).read_text())
    assert "qc" not in meta  # calibrate_qc=False
    one = {**meta, "input_channels": ["t1w"], "model": {**meta["model"], "in_channels": 1}}
    (out / METADATA_FILE).write_text(json.dumps(one))
    with pytest.raises(DataError, match="does not fit the network"):  # the check accepts T1w
        load_exported_model(out)
