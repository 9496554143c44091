"""Tests of neonb.segmentation and ``neonb segment``: one scan, any grid, batches that resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nibabel import orientations
from nibabel.processing import resample_to_output
from tiny_model import TINY, tiny_channel_run, tiny_cohort, tiny_run

from neonb import data, segmentation
from neonb.cli import main
from neonb.errors import DataError
from neonb.experiment import (
    TrainingConfig,
    evaluate,
    load_trained_run,
    prediction_filename,
    prepare_volumes,
)
from neonb.export import export_run, load_exported_model
from neonb.labels import NUM_CLASSES
from neonb.segmentation import (
    BATCH_SUMMARY_FILE,
    output_paths,
    output_prefix,
    plan_grid,
    prepare_image,
    segment_batch,
    segment_scan,
)
from neonb.transforms import eval_transforms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), seed=3)


@pytest.fixture(scope="module")
def manifest(cohort):
    return data.read_manifest(cohort, progress=False)


@pytest.fixture(scope="module")
def model_dir(cohort, manifest, tmp_path_factory):
    run = tiny_run(manifest, tmp_path_factory.mktemp("run"))
    return export_run(run, tmp_path_factory.mktemp("model") / "tiny", data_root=cohort)


def _session(manifest, i=0):
    row = manifest.iloc[i]
    return {key: Path(row[key]) for key in ("t1w", "t2w", "dseg")}, row


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_output_names_follow_bids_derivatives():
    assert output_prefix("sub-CC1_ses-7_desc-restore_T2w.nii.gz") == "sub-CC1_ses-7"
    assert output_prefix("/a/sub-1_ses-2_run-3_space-T2w_T1w.nii") == "sub-1_ses-2_run-3"
    assert output_prefix("my scan.nii.gz") == "myscan"
    paths = output_paths("out", output_prefix("sub-CC1_ses-7_desc-restore_T2w.nii.gz"))
    assert paths["dseg"].name == prediction_filename("CC1", "7")
    assert list(paths)[-1] == "dseg"  # written last: its presence means the session is done


def test_segment_one_scan_writes_every_output(model_dir, manifest, tmp_path, capsys):
    paths, _ = _session(manifest)
    out = tmp_path / "out"
    args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"])]
    args += ["--reference", str(paths["dseg"]), "--model", str(model_dir), "--out", str(out)]
    assert main(args) == 0
    assert "segmentation written to" in capsys.readouterr().out
    prefix = output_prefix(paths["t2w"]) + "_desc-neonb"
    assert _files(out) == sorted(
        f"{prefix}_{suffix}"
        for suffix in ("dseg.nii.gz", "dseg.tsv", "dseg.json", "volumes.tsv", "qc.png", "dice.tsv")
    )
    t2w = nib.load(paths["t2w"])
    seg = nib.load(out / f"{prefix}_dseg.nii.gz")
    assert seg.shape == t2w.shape and np.allclose(seg.affine, t2w.affine)
    assert seg.get_data_dtype() == np.uint8
    assert seg.header.get_intent()[0] == "label"
    labels = np.asarray(seg.dataobj)
    assert labels.max() < NUM_CLASSES and len(np.unique(labels)) > 2

    volumes = pd.read_csv(out / f"{prefix}_volumes.tsv", sep="\t")
    assert list(volumes["index"]) == list(range(NUM_CLASSES))
    voxel_ml = float(np.prod(t2w.header.get_zooms())) / 1000
    assert volumes["volume_ml"].sum() == pytest.approx(labels.size * voxel_ml)
    assert volumes.loc[3, "volume_ml"] == pytest.approx((labels == 3).sum() * voxel_ml)
    lut = pd.read_csv(out / f"{prefix}_dseg.tsv", sep="\t")
    assert list(lut.columns[:3]) == ["index", "name", "abbreviation"] and len(lut) == NUM_CLASSES
    dice = pd.read_csv(out / f"{prefix}_dice.tsv", sep="\t")["dice"]
    assert dice.dropna().between(0, 1).all() and dice[0] > 0.5  # outer background is easy

    png = (out / f"{prefix}_qc.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", png[16:24])
    assert width > 3 * height / 2 and height >= 200  # three panels side by side
    sidecar = json.loads((out / f"{prefix}_dseg.json").read_text())
    assert sidecar["Resampled"] is False and sidecar["Reoriented"] is False
    assert Path(sidecar["Sources"][0]) == paths["t2w"].resolve()
    assert sidecar["InferencePrecision"] == segmentation.precision("cpu")


def test_precision_fp32_and_bf16_on_the_command_line(model_dir, manifest, tmp_path):
    paths, _ = _session(manifest)
    labels = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / choice
        args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"])]
        args += ["--model", str(model_dir), "--out", str(out), "--precision", choice]
        assert main([*args, "--device", "cpu"]) == 0
        sidecar = json.loads(next(out.glob("*_dseg.json")).read_text())
        assert sidecar["InferencePrecision"] == choice
        labels[choice] = np.asarray(nib.load(next(out.glob("*_dseg.nii.gz"))).dataobj)
    assert (labels["fp32"] == labels["bf16"]).mean() > 0.95  # a 2-epoch model: near ties


def test_normalisation_is_the_training_one(model_dir, manifest):
    """neonb segment and the study's evaluation prepare an image through one function."""
    paths, _ = _session(manifest)
    model = load_exported_model(model_dir)
    t2w, t1w = nib.load(paths["t2w"]), nib.load(paths["t1w"])
    mapping = plan_grid(t2w, model.orientation, model.voxel_size_mm)
    ours = prepare_image([t1w.get_fdata(), t2w.get_fdata()], mapping, model.channels)
    sample = {"t1w": str(paths["t1w"]), "t2w": str(paths["t2w"]), "label": str(paths["dseg"])}
    theirs = eval_transforms(crop=False)(sample)["image"]
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())
    np.testing.assert_allclose(ours.affine, theirs.affine)
    assert float(ours[0][ours[0] != 0].std()) == pytest.approx(1.0, abs=1e-3)  # normalised


def _reorient(image: nib.Nifti1Image, codes: str, path: Path) -> Path:
    transform = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(tuple(codes))
    )
    nib.save(image.as_reoriented(transform), path)
    return path


def test_any_orientation_gives_the_same_labels(model_dir, manifest, tmp_path):
    paths, _ = _session(manifest)
    model = load_exported_model(model_dir)
    plain = segment_scan(model, paths["t2w"], tmp_path / "ras", t1w=paths["t1w"], device="cpu")
    t2w = _reorient(nib.load(paths["t2w"]), "PSL", tmp_path / "sub-x_ses-1_T2w.nii.gz")
    t1w = _reorient(nib.load(paths["t1w"]), "PSL", tmp_path / "sub-x_ses-1_T1w.nii.gz")
    turned = segment_scan(model, t2w, tmp_path / "psl", t1w=t1w, device="cpu")
    assert turned.notes == ["reoriented from PSL to the model's RAS and back"]
    seg = nib.load(turned.outputs["dseg"])
    assert "".join(nib.aff2axcodes(seg.affine)) == "PSL"
    np.testing.assert_allclose(seg.affine, nib.load(t2w).affine)
    back = _reorient(seg, "RAS", tmp_path / "back.nii.gz")
    expected = np.asarray(nib.load(plain.outputs["dseg"]).dataobj)
    assert np.array_equal(np.asarray(nib.load(back).dataobj), expected)
    pd.testing.assert_frame_equal(turned.volumes, plain.volumes)


def test_other_voxel_size_is_resampled_and_said(model_dir, manifest, tmp_path, capsys):
    paths, _ = _session(manifest)
    for key in ("t2w", "t1w"):
        fine = resample_to_output(nib.load(paths[key]), voxel_sizes=(4.0, 4.0, 4.0), order=1)
        nib.save(fine, tmp_path / f"sub-x_ses-1_{key}.nii.gz")
    t2w = tmp_path / "sub-x_ses-1_t2w.nii.gz"
    args = ["segment", "--t2", str(t2w), "--t1", str(tmp_path / "sub-x_ses-1_t1w.nii.gz")]
    assert main([*args, "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "resampled from 4 x 4 x 4 mm voxels to the model's 6 x 6 x 6 mm" in said
    seg = nib.load(tmp_path / "out" / "sub-x_ses-1_desc-neonb_dseg.nii.gz")
    reference = nib.load(t2w)
    assert seg.shape == reference.shape and np.allclose(seg.affine, reference.affine)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) > {0}
    sidecar = json.loads((tmp_path / "out" / "sub-x_ses-1_desc-neonb_dseg.json").read_text())
    assert sidecar["Resampled"] is True and sidecar["InputVoxelSizeMm"] == [4.0, 4.0, 4.0]


def test_a_failed_write_leaves_no_partial_outputs(model_dir, manifest, tmp_path, monkeypatch):
    paths, _ = _session(manifest)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segmentation, "save_segmentation", disk_full)
    with pytest.raises(DataError, match="cannot be written: No space left on device"):
        segment_scan(model_dir, paths["t2w"], tmp_path / "out", t1w=paths["t1w"], device="cpu")
    assert _files(tmp_path / "out") == []


def _manifest_tsv(manifest, path: Path, rows=None) -> Path:
    table = manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w", "dseg"]]
    table = table if rows is None else table.iloc[rows]
    table.to_csv(path, sep="\t", index=False)
    return path


def test_batch_reports_failures_and_resumes(model_dir, manifest, tmp_path, capsys):
    broken = tmp_path / "broken_T2w.nii.gz"
    broken.write_bytes(b"not a gzip file")
    table = manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].copy()
    table["t2w"] = table["t2w"].astype(object)
    table.loc[1, "t2w"] = broken.name  # relative to the manifest's folder
    tsv = tmp_path / "batch.tsv"
    table.iloc[:3].to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "derivatives"
    args = ["segment", "--batch", str(tsv), "--model", str(model_dir), "--out", str(out)]

    assert main(args) == 1
    captured = capsys.readouterr()
    assert "3 sessions: 2 segmented, 0 already done, 1 failed" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("neonb segment: error:") and "1 of 3 sessions failed" in last
    summary = pd.read_csv(out / BATCH_SUMMARY_FILE, sep="\t", dtype={"session_id": str})
    assert list(summary["status"]) == ["done", "failed", "done"]
    assert "corrupt gzip" in summary.loc[1, "message"] and str(broken) in summary.loc[1, "message"]
    first = manifest.iloc[0]
    session_dir = out / f"sub-{first.participant_id}" / f"ses-{first.session_id}" / "anat"
    done = session_dir / prediction_filename(first.participant_id, first.session_id)
    stamp = done.stat().st_mtime_ns
    failed = manifest.iloc[1]
    assert not (out / f"sub-{failed.participant_id}").exists()
    assert (out / "dataset_description.json").is_file()

    table.loc[1, "t2w"] = manifest.loc[1, "t2w"]  # fixed: run the same batch again
    table.iloc[:3].to_csv(tsv, sep="\t", index=False)
    assert main(args) == 0
    assert "3 sessions: 1 segmented, 2 already done, 0 failed" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == stamp  # a finished session is not redone


@pytest.mark.parametrize("prefetch", [True, False])
def test_interrupted_batch_resumes(model_dir, manifest, tmp_path, monkeypatch, prefetch):
    tsv = _manifest_tsv(manifest, tmp_path / "batch.tsv", rows=[0, 1, 2])
    real = segmentation._infer_session
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(segmentation, "_infer_session", interrupt_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment_batch(model_dir, tsv, out, device="cpu", progress=False, prefetch=prefetch)
    summary = pd.read_csv(out / BATCH_SUMMARY_FILE, sep="\t")
    assert list(summary["status"]) == ["done"]  # the first was written before the interrupt
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == {f"sub-{manifest.iloc[0].participant_id}"}  # none left for 2nd and 3rd
    monkeypatch.setattr(segmentation, "_infer_session", real)
    result = segment_batch(model_dir, tsv, out, device="cpu", progress=False, prefetch=prefetch)
    assert list(result.summary["status"]) == ["skipped", "done", "done"]
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files


def test_prefetching_batch_gives_the_same_outputs_and_order(model_dir, manifest, tmp_path):
    broken = tmp_path / "broken_T2w.nii.gz"
    broken.write_bytes(b"not a gzip file")
    table = manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].copy()
    table["t2w"] = table["t2w"].astype(object)
    table.loc[1, "t2w"] = str(broken)
    tsv = tmp_path / "batch.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    lines = []
    one_by_one = segment_batch(
        model_dir, tsv, tmp_path / "a", device="cpu", progress=False, prefetch=False
    )
    overlapped = segment_batch(
        model_dir, tsv, tmp_path / "b", device="cpu", progress=False, echo=lines.append
    )
    columns = ["participant_id", "session_id", "status", "message"]
    pd.testing.assert_frame_equal(one_by_one.summary[columns], overlapped.summary[columns])
    assert list(overlapped.summary["participant_id"]) == list(manifest["participant_id"])
    assert list(overlapped.summary["status"]) == ["done", "failed", "done", "done"]
    assert len(lines) == 1 and "corrupt gzip" in lines[0]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    for name in _files(tmp_path / "a"):
        if name.endswith("_dseg.nii.gz"):
            a, b = (np.asarray(nib.load(tmp_path / d / name).dataobj) for d in "ab")
            assert np.array_equal(a, b)


def test_progress_bar_shows_sessions_per_minute(model_dir, manifest, tmp_path, capsys):
    tsv = _manifest_tsv(manifest, tmp_path / "batch.tsv", rows=[0, 1])
    segment_batch(model_dir, tsv, tmp_path / "out", device="cpu", progress=True)
    bar = capsys.readouterr().err
    assert "2/2" in bar and " sessions/min" in bar


def test_batch_over_a_release_folder_evaluates(model_dir, cohort, manifest, tmp_path):
    result = segment_batch(
        model_dir, cohort, tmp_path / "out", evaluate=True, device="cpu", progress=False
    )
    assert result.count("done") == len(manifest)
    for row in manifest.itertuples():
        anat = tmp_path / "out" / f"sub-{row.participant_id}" / f"ses-{row.session_id}" / "anat"
        dice = pd.read_csv(
            anat / f"sub-{row.participant_id}_ses-{row.session_id}_desc-neonb_dice.tsv", sep="\t"
        )
        assert dice["dice"].dropna().between(0, 1).all()
    volumes = pd.read_csv(result.tables["volumes"], sep="\t", dtype={"session_id": str})
    assert list(volumes["participant_id"]) == list(manifest["participant_id"])
    assert volumes["scan_age"].tolist() == pytest.approx(manifest["scan_age"].tolist())
    assert (volumes["volume_ml_WM"] > 0).all() and "volume_ml_Hippoc" in volumes
    first = manifest.iloc[0]
    per_session = pd.read_csv(
        tmp_path / "out" / f"sub-{first.participant_id}" / f"ses-{first.session_id}" / "anat"
        / f"sub-{first.participant_id}_ses-{first.session_id}_desc-neonb_volumes.tsv",
        sep="\t",
    )  # fmt: skip
    assert volumes.loc[0, "volume_ml_CSF"] == pytest.approx(per_session.loc[1, "volume_ml"])
    gathered_dice = pd.read_csv(result.tables["dice"], sep="\t")
    assert len(gathered_dice) == len(manifest) and "dice_cGM" in gathered_dice


def test_age_model_writes_the_predicted_age(manifest, cohort, tmp_path, capsys):
    ageunet = pytest.importorskip("neonb.ageunet")
    records = data.to_data_dicts(manifest)
    config = TrainingConfig.from_dict({**TINY, "epochs": 1})
    ageunet.train_ageunet(
        records[:3], records[3:], config, ageunet.AgeHeadConfig(), tmp_path / "run", progress=False
    )
    model_dir = export_run(tmp_path / "run", tmp_path / "model", data_root=cohort)
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["architecture"] == "AgeUNet" and meta["age_head"]["reduction"] == "conv"
    assert meta["age_standardisation"]["std_weeks"] > 0
    assert load_exported_model(model_dir).age_head == meta["age_head"]

    tsv = _manifest_tsv(manifest, tmp_path / "batch.tsv", rows=[0])
    result = segment_batch(model_dir, tsv, tmp_path / "out", device="cpu", progress=False)
    assert list(result.summary["status"]) == ["done"]
    row = manifest.iloc[0]
    anat = tmp_path / "out" / f"sub-{row.participant_id}" / f"ses-{row.session_id}" / "anat"
    age = pd.read_csv(
        anat / f"sub-{row.participant_id}_ses-{row.session_id}_desc-neonb_age.tsv", sep="\t"
    )
    assert np.isfinite(age.loc[0, "predicted_age_weeks"])
    assert age.loc[0, "scan_age_weeks"] == pytest.approx(row.scan_age)
    gathered = pd.read_csv(result.tables["volumes"], sep="\t")
    assert gathered.loc[0, "predicted_age_weeks"] == pytest.approx(
        age.loc[0, "predicted_age_weeks"]
    )

    paths, _ = _session(manifest)
    args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"])]
    args += ["--scan-age", "40.5", "--model", str(model_dir), "--out", str(tmp_path / "one")]
    assert main(args) == 0
    assert "predicted scan age:" in capsys.readouterr().out
    prefix = output_prefix(paths["t2w"])
    one = pd.read_csv(tmp_path / "one" / f"{prefix}_desc-neonb_age.tsv", sep="\t")
    assert one.loc[0, "scan_age_weeks"] == 40.5 and np.isfinite(one.loc[0, "predicted_age_weeks"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_one_line(model_dir, manifest, tmp_path, capsys):
    paths, _ = _session(manifest)
    args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"]), "--device", "cuda"]
    assert main([*args, "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "neonb segment: error: device 'cuda' asked for, but no CUDA GPU is available"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# Models of one input channel: T2w alone, T1w alone
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2w_run(manifest, tmp_path_factory):
    return tiny_channel_run(manifest, tmp_path_factory.mktemp("t2w-run"), ("t2w",))


@pytest.fixture(scope="module")
def t1w_model(cohort, manifest, tmp_path_factory):
    run = tiny_channel_run(manifest, tmp_path_factory.mktemp("t1w-run"), ("t1w",))
    return export_run(run, tmp_path_factory.mktemp("t1w-model") / "t1w", data_root=cohort)


def _copy_as(source: Path, path: Path) -> Path:
    path.write_bytes(source.read_bytes())
    return path


def test_a_t2w_run_trains_exports_and_segments_a_t2w_alone(
    t2w_run, cohort, manifest, tmp_path, capsys
):
    run, config = load_trained_run(t2w_run)
    assert config.channels == ("t2w",) and config.model.in_channels == 1
    assert "t1w" not in config.to_dict()["channels"]
    volumes = prepare_volumes(data.to_data_dicts(manifest)[:1], channels=config.channels)
    scores = evaluate(run.model, volumes, config, out_dir=tmp_path / "predictions")
    assert len(scores.per_volume) == 1 and volumes[0]["image"].shape[0] == 1

    model_dir = export_run(t2w_run, tmp_path / "model", data_root=cohort)
    metadata = json.loads((model_dir / "model.json").read_text())
    assert metadata["input_channels"] == ["t2w"] and metadata["model"]["in_channels"] == 1
    assert metadata["qc"]["n_sessions"] == 1  # calibrated on the T2w of its validation session

    paths, _ = _session(manifest)
    out = tmp_path / "out"
    args = ["segment", "--t2", str(paths["t2w"]), "--model", str(model_dir), "--out", str(out)]
    assert main(args) == 0
    seg = nib.load(out / f"{output_prefix(paths['t2w'])}_desc-neonb_dseg.nii.gz")
    assert seg.shape == nib.load(paths["t2w"]).shape
    sidecar = json.loads(next(out.glob("*_dseg.json")).read_text())
    assert sidecar["Sources"] == [str(paths["t2w"].resolve())]

    only_t1 = ["segment", "--t1", str(paths["t1w"]), "--model", str(model_dir)]
    assert main([*only_t1, "--out", str(tmp_path / "t1")]) == 1
    err = capsys.readouterr().err
    assert f"the model {model_dir} needs T2w inputs" in err and "add --t2 FILE" in err


def test_a_t1w_model_segments_a_t1w_alone_named_after_it(t1w_model, manifest, tmp_path, capsys):
    assert load_exported_model(t1w_model).channels == ("t1w",)
    paths, _ = _session(manifest)
    t1w = _copy_as(paths["t1w"], tmp_path / "baby T1.nii.gz")  # a name that is not BIDS
    out = tmp_path / "out"
    args = ["segment", "--t1", str(t1w), "--model", str(t1w_model), "--out", str(out)]
    assert main(args) == 0
    assert "segmentation written to" in capsys.readouterr().out
    assert all(name.startswith("babyT1_desc-neonb_") for name in _files(out))
    seg = nib.load(out / "babyT1_desc-neonb_dseg.nii.gz")
    assert seg.shape == nib.load(t1w).shape and np.allclose(seg.affine, nib.load(t1w).affine)
    assert json.loads((out / "babyT1_desc-neonb_dseg.json").read_text())["Sources"] == [
        str(t1w.resolve())
    ]

    only_t2 = ["segment", "--t2", str(paths["t2w"]), "--model", str(t1w_model)]
    assert main([*only_t2, "--out", str(tmp_path / "t2")]) == 1
    err = capsys.readouterr().err
    assert f"the model {t1w_model} needs T1w inputs" in err and "add --t1 FILE" in err
    assert main(["segment", "--model", str(t1w_model), "--out", str(tmp_path / "none")]) == 1
    assert "give the scan to segment" in capsys.readouterr().err


def test_a_batch_needs_the_columns_of_the_models_channels(
    t1w_model, model_dir, manifest, tmp_path, capsys
):
    table = manifest[["participant_id", "session_id", "scan_age", "t1w"]].iloc[:2]
    tsv = tmp_path / "t1w_only.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    result = segment_batch(t1w_model, tsv, tmp_path / "t1w", progress=False)
    assert result.count("done") == 2

    args = ["segment", "--batch", str(tsv), "--model", str(model_dir), "--out", str(tmp_path / "x")]
    assert main(args) == 1  # the T1w+T2w model needs a t2w column
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"neonb segment: error: {tsv}: lacks the column(s) ['t2w']")
    assert "T1w and T2w" in err and "\n" not in err

    gap = manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].iloc[:1].copy()
    gap["t1w"] = "n/a"  # the column is there, the image is not
    gap.to_csv(tsv, sep="\t", index=False)
    result = segment_batch(t1w_model, tsv, tmp_path / "gap", progress=False)
    message = result.summary.loc[0, "message"]
    assert result.count("failed") == 1 and f"the model {t1w_model} needs T1w" in message
