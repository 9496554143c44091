"""Tests of neonb segment's flip TTA, uncertainty map, QC score and flag, and of the
class probabilities resampled back to the input's grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nibabel.processing import resample_to_output
from tiny_model import tiny_cohort, tiny_run
from torch import nn

from neonb import data
from neonb.cli import main
from neonb.errors import DataError, NeonbWarning
from neonb.experiment import VAL_SESSIONS_FILE
from neonb.export import calibrate_qc, describe_qc, export_run, load_exported_model, write_qc
from neonb.inference import flip_combinations, normalised_entropy, predict_foreground
from neonb.metrics import dice_per_class
from neonb.segmentation import (
    BATCH_SUMMARY_FILE,
    from_model_grid,
    from_model_grid_probabilities,
    plan_grid,
    qc_flag,
    qc_score,
    segment_batch,
    segment_scan,
    tta_flips,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), seed=5)


@pytest.fixture(scope="module")
def manifest(cohort):
    return data.read_manifest(cohort, progress=False)


@pytest.fixture(scope="module")
def run_dir(manifest, tmp_path_factory):
    run = tiny_run(manifest, tmp_path_factory.mktemp("run"))
    return run


@pytest.fixture(scope="module")
def model_dir(cohort, run_dir, tmp_path_factory):
    """The run's model folder without a QC threshold (each test sets the one it needs)."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    return export_run(run_dir, out, data_root=cohort, calibrate_qc=False)


# --------------------------------------------------------------------------------------
# Flip TTA and entropy
# --------------------------------------------------------------------------------------


def _image(shape=(2, 12, 10, 9), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) + 3.0  # non-zero everywhere


def test_flip_combinations_are_every_non_empty_subset():
    assert flip_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert flip_combinations(()) == []


def test_flip_tta_of_a_flip_symmetric_model_equals_no_tta():
    torch.manual_seed(0)
    pointwise = nn.Conv3d(2, 4, kernel_size=1)  # commutes with every flip
    image = _image()
    kwargs = {"patch_size": (8, 8, 8), "overlap": 0.5, "device": "cpu", "amp": False}
    flips = flip_combinations((0, 1, 2))
    plain, box = predict_foreground(pointwise, image, **kwargs)
    tta, box_tta = predict_foreground(pointwise, image, flips=flips, **kwargs)
    assert box == box_tta
    assert torch.allclose(plain, tta, atol=1e-5)

    asymmetric = nn.Conv3d(2, 4, kernel_size=3, padding=1)  # a 3³ kernel does not commute
    plain, _ = predict_foreground(asymmetric, image, **kwargs)
    tta, _ = predict_foreground(asymmetric, image, flips=flips, **kwargs)
    assert not torch.allclose(plain, tta, atol=1e-3)
    assert torch.allclose(tta.sum(0), torch.ones(()), atol=1e-5)  # still probabilities


def test_entropy_is_zero_for_a_confident_model_and_one_for_a_uniform_one():
    confident = torch.zeros(10, 4, 4, 4)
    confident[3] = 1.0
    assert float(normalised_entropy(confident).max()) < 1e-6
    uniform = torch.full((10, 4, 4, 4), 0.1)
    assert torch.allclose(normalised_entropy(uniform), torch.ones(4, 4, 4), atol=1e-5)
    half = torch.zeros(10, 2, 2, 2)
    half[:2] = 0.5
    assert torch.allclose(
        normalised_entropy(half), torch.full((2, 2, 2), math.log(2) / math.log(10))
    )


def test_qc_score_averages_inside_the_brain_and_the_flag_follows_the_threshold():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    uncertainty = np.full((4, 4, 4), 0.9, np.float32)
    uncertainty[labels > 0] = 0.2
    score = qc_score(uncertainty, labels, brain_labels=range(1, 10))
    assert score == pytest.approx(0.2)
    assert qc_flag(score, 0.1) is True
    assert qc_flag(score, 0.3) is False
    assert qc_flag(score, None) is None
    assert math.isnan(qc_score(uncertainty, np.zeros_like(labels), range(1, 10)))
    assert qc_flag(math.nan, 0.3) is True


def test_tta_flips_come_from_the_training_augmentation(model_dir):
    model = load_exported_model(model_dir)
    assert len(tta_flips(model)) == 7  # the default flip axes 0, 1, 2
    model.metadata["training_config"]["augmentation"]["flip_axes"] = [0]
    assert tta_flips(model) == [(0,)]
    model.metadata["training_config"]["augmentation"]["flip_prob"] = 0.0
    assert tta_flips(model) == []


# --------------------------------------------------------------------------------------
# Probabilities back to the input grid
# --------------------------------------------------------------------------------------


def _sphere_probs(shape, spacing, radius_mm, centre_mm):
    """Two-class probabilities of a ball on a grid, a smooth ramp across its surface."""
    axes = [np.arange(n) * spacing for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    distance = np.sqrt(((grid - np.reshape(centre_mm, (3, 1, 1, 1))) ** 2).sum(0))
    inside = 1 / (1 + np.exp(-(radius_mm - distance) / spacing))
    return np.stack([1 - inside, inside]).astype(np.float32), distance


def test_probabilities_resampled_back_follow_the_surface_better_than_nearest_labels():
    coarse, fine = 3.0, 1.0
    fine_shape = (36, 36, 36)
    input_image = nib.Nifti1Image(np.ones(fine_shape, np.float32), np.diag([fine] * 3 + [1]))
    mapping = plan_grid(input_image, "RAS", (coarse,) * 3)
    assert mapping.resampled
    model_shape = (12, 12, 12)
    centre, radius = (17.3, 16.6, 17.9), 9.4
    model_affine = np.diag([coarse] * 3 + [1])
    model_affine[:3, 3] = (coarse - fine) / 2  # coarse voxel j covers fine voxels 3j..3j+2
    probs, _ = _sphere_probs(model_shape, coarse, radius, np.subtract(centre, model_affine[:3, 3]))

    new = from_model_grid_probabilities(torch.from_numpy(probs), model_affine, mapping)
    old = from_model_grid(probs.argmax(0).astype(np.uint8), model_affine, mapping)
    _, distance = _sphere_probs(fine_shape, fine, radius, centre)
    truth = (distance <= radius).astype(np.uint8)
    assert new.shape == old.shape == truth.shape
    dice_new = dice_per_class(new, truth, num_classes=2)[1]
    dice_old = dice_per_class(old, truth, num_classes=2)[1]
    assert dice_new > dice_old + 0.01


def test_probabilities_inside_a_box_equal_the_full_volume(model_dir):
    rng = np.random.default_rng(0)
    full = rng.dirichlet(np.ones(3), size=(8, 9, 7)).transpose(3, 0, 1, 2).astype(np.float32)
    box = (slice(2, 6), slice(1, 8), slice(0, 7))
    full[:, :2] = full[:, 6:] = 0
    full[0, :2] = full[0, 6:] = 1
    full[:, :, :1] = 0
    full[0, :, :1] = 1
    full[:, :, 8:] = 0
    full[0, :, 8:] = 1
    image = nib.Nifti1Image(np.ones((16, 18, 14), np.float32), np.diag([1.0, 1, 1, 1]))
    mapping = plan_grid(image, "RAS", (2.0, 2.0, 2.0))
    affine = np.diag([2.0, 2, 2, 1])
    affine[:3, 3] = 0.5
    whole = from_model_grid_probabilities(torch.from_numpy(full), affine, mapping)
    boxed = from_model_grid_probabilities(
        torch.from_numpy(full[(slice(None), *box)].copy()), affine, mapping,
        box=box, model_shape=full.shape[1:],
    )  # fmt: skip
    assert np.array_equal(whole, boxed)
    assert set(np.unique(whole)) <= {0, 1, 2} and len(np.unique(whole)) == 3


# --------------------------------------------------------------------------------------
# neonb segment --tta, one scan and batches; calibration at export
# --------------------------------------------------------------------------------------


def _session(manifest, i=0):
    row = manifest.iloc[i]
    return {key: Path(row[key]) for key in ("t1w", "t2w", "dseg")}


def test_tta_writes_an_uncertainty_map_and_the_qc_score(model_dir, manifest, tmp_path):
    paths = _session(manifest)
    plain = segment_scan(model_dir, paths["t2w"], tmp_path / "plain", t1w=paths["t1w"], amp=False)
    assert plain.qc_uncertainty is None and "uncertainty" not in plain.outputs
    result = segment_scan(
        model_dir, paths["t2w"], tmp_path / "tta", t1w=paths["t1w"], amp=False, tta=True
    )
    map_path = result.outputs["uncertainty"]
    assert map_path.name.endswith("_desc-neonb_uncertainty.nii.gz")
    uncertainty = nib.load(map_path)
    t2w = nib.load(paths["t2w"])
    assert uncertainty.shape == t2w.shape and np.allclose(uncertainty.affine, t2w.affine)
    values = np.asarray(uncertainty.dataobj)
    assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    labels = np.asarray(nib.load(result.outputs["dseg"]).dataobj)
    assert result.qc_uncertainty == pytest.approx(values[labels > 0].mean(), rel=1e-5)
    assert result.qc_flag is None  # no threshold in this model folder
    sidecar = json.loads(result.outputs["sidecar"].read_text())
    assert sidecar["TestTimeAugmentation"]["Passes"] == 8
    assert sidecar["QCUncertainty"] == pytest.approx(result.qc_uncertainty)
    assert any("8 passes" in note for note in result.notes)


def test_the_flag_follows_the_model_folders_threshold(model_dir, manifest, tmp_path):
    paths = _session(manifest, 1)
    args = ["segment", "--t2", str(paths["t2w"]), "--t1", str(paths["t1w"]), "--tta"]
    flagged = tmp_path / "model-low"
    for name in ("model.json", "model.safetensors"):
        (flagged / name).parent.mkdir(exist_ok=True)
        (flagged / name).write_bytes((model_dir / name).read_bytes())
    write_qc(flagged, {"threshold": 0.0})
    result = segment_scan(flagged, paths["t2w"], tmp_path / "low", t1w=paths["t1w"], tta=True)
    assert result.qc_flag is True
    write_qc(flagged, {"threshold": 1.0})
    result = segment_scan(flagged, paths["t2w"], tmp_path / "high", t1w=paths["t1w"], tta=True)
    assert result.qc_flag is False
    assert main([*args, "--model", str(flagged), "--out", str(tmp_path / "cli")]) == 0


def test_a_bad_threshold_is_refused(model_dir, tmp_path):
    with pytest.raises(DataError, match="qc.threshold"):
        write_qc(model_dir, {"threshold": 2.0})
    assert "qc" not in json.loads((model_dir / "model.json").read_text())


def test_batch_has_qc_columns_and_lists_flagged_sessions(model_dir, manifest, tmp_path, capsys):
    table = manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].iloc[:2]
    tsv = tmp_path / "batch.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    low = tmp_path / "model-low"
    low.mkdir()
    for name in ("model.json", "model.safetensors"):
        (low / name).write_bytes((model_dir / name).read_bytes())
    write_qc(low, {"threshold": 0.0})
    out = tmp_path / "derivatives"
    args = ["segment", "--batch", str(tsv), "--model", str(low), "--out", str(out), "--tta"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "2 flagged by QC" in said
    for row in table.itertuples():
        assert f"sub-{row.participant_id} ses-{row.session_id}" in said
    summary = pd.read_csv(out / BATCH_SUMMARY_FILE, sep="\t")
    assert summary["qc_uncertainty"].between(0, 1).all()
    assert summary["qc_flag"].tolist() == [True, True]

    assert main(args) == 0  # resumed: skipped sessions keep their QC from the sidecar
    summary = pd.read_csv(out / BATCH_SUMMARY_FILE, sep="\t")
    assert summary["status"].tolist() == ["skipped", "skipped"]
    assert summary["qc_flag"].tolist() == [True, True]

    plain = segment_batch(model_dir, tsv, tmp_path / "plain", progress=False)
    assert plain.summary["qc_uncertainty"].isna().all()


def test_calibration_at_export_stores_a_quantile_of_the_scores(model_dir, manifest, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.json", "model.safetensors"):
        (model / name).write_bytes((model_dir / name).read_bytes())
    tsv = tmp_path / "validation.tsv"
    manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].iloc[2:].to_csv(
        tsv, sep="\t", index=False
    )
    qc = calibrate_qc(model, tsv, quantile=0.5)
    scores = list(qc["scores"].values())
    assert len(scores) == 2 and qc["n_sessions"] == 2
    assert qc["threshold"] == pytest.approx(np.median(scores))
    assert load_exported_model(model).metadata["qc"]["threshold"] == qc["threshold"]


def test_resampled_input_with_tta_keeps_the_input_grid(model_dir, manifest, tmp_path):
    paths = _session(manifest)
    for key in ("t2w", "t1w"):
        fine = resample_to_output(nib.load(paths[key]), voxel_sizes=(4.0, 4.0, 4.0), order=1)
        nib.save(fine, tmp_path / f"sub-x_ses-1_{key}.nii.gz")
    t2w = tmp_path / "sub-x_ses-1_t2w.nii.gz"
    result = segment_scan(
        model_dir, t2w, tmp_path / "out", t1w=tmp_path / "sub-x_ses-1_t1w.nii.gz", tta=True
    )
    assert any("class probabilities back" in note for note in result.notes)
    shape = nib.load(t2w).shape
    assert nib.load(result.outputs["uncertainty"]).shape == shape
    assert nib.load(result.outputs["dseg"]).shape == shape


def test_probabilities_back_agree_with_monai_resampling_of_each_class():
    """The slab-wise sampling places voxels as MONAI's SpatialResample does, on an oblique,
    reoriented input grid too."""
    from neonb.segmentation import _resample_back

    rng = np.random.default_rng(1)
    smooth = torch.nn.functional.avg_pool3d(
        torch.from_numpy(rng.random((4, 14, 13, 12), dtype=np.float32))[None], 3, 1, 1
    )[0]
    probs = torch.softmax(smooth * 30, dim=0)
    rotation = nib.eulerangles.euler2mat(0.3, -0.2, 0.1)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.3, -1.1, 1.2])
    affine[:3, 3] = (-3, 20, 5)
    image = nib.Nifti1Image(np.ones((21, 19, 20), np.float32), affine)
    mapping = plan_grid(image, "RAS", (2.0, 2.0, 2.0))
    model_affine = mapping.reoriented_affine.copy()
    model_affine[:3, :3] = model_affine[:3, :3] @ np.diag(
        2.0 / np.sqrt((model_affine[:3, :3] ** 2).sum(0))
    )
    ours = from_model_grid_probabilities(probs, model_affine, mapping)
    each = np.stack([_resample_back(p, model_affine, mapping, "bilinear") for p in probs])
    theirs = np.where(each.max(0) > 0, each.argmax(0), 0)
    theirs = from_model_grid(theirs.astype(np.uint8), np.eye(4), _unresampled(mapping))
    assert ours.shape == image.shape
    assert (ours == theirs).mean() > 0.995
    assert len(np.unique(ours)) > 2


def _unresampled(mapping):
    """The same mapping without resampling: only the reorientation back."""
    from dataclasses import replace

    return replace(mapping, target_voxel_size_mm=None)


def test_export_calibrates_qc_on_the_command_line(run_dir, cohort, manifest, tmp_path, capsys):
    tsv = tmp_path / "validation.tsv"
    manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].iloc[3:].to_csv(
        tsv, sep="\t", index=False
    )
    out = tmp_path / "model"
    args = ["export", str(run_dir), "--out", str(out), "--data-root", str(cohort)]
    assert main([*args, "--calibrate-qc", str(tsv), "--qc-quantile", "1"]) == 0
    assert "QC threshold" in capsys.readouterr().out
    qc = json.loads((out / "model.json").read_text())["qc"]
    assert qc["n_sessions"] == 1 and qc["quantile"] == 1
    assert qc["threshold"] == pytest.approx(next(iter(qc["scores"].values())))
    assert main([*args, "--calibrate-qc", str(tsv), "--qc-quantile", "0"]) == 1
    assert "--qc-quantile must be in (0, 1]" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# QC calibrated at export on the run's validation sessions
# --------------------------------------------------------------------------------------


def _copy_run(run_dir: Path, to: Path) -> Path:
    to.mkdir()
    for path in run_dir.iterdir():
        if path.is_file():
            (to / path.name).write_bytes(path.read_bytes())
    return to


def test_the_run_records_its_validation_sessions(run_dir, manifest):
    recorded = pd.read_csv(run_dir / VAL_SESSIONS_FILE, sep="\t")
    validation = manifest.iloc[3:]  # tiny_run validates on the fourth session
    assert recorded["participant_id"].astype(str).tolist() == validation["participant_id"].tolist()
    assert recorded["session_id"].astype(str).tolist() == validation["session_id"].tolist()
    assert recorded["scan_age"].tolist() == pytest.approx(validation["scan_age"].tolist())
    for column, key in (("t1w", "t1w"), ("t2w", "t2w"), ("dseg", "dseg")):
        assert Path(recorded[column].iloc[0]) == Path(validation[key].iloc[0]).resolve()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # written atomically


def test_export_calibrates_qc_on_the_runs_validation_sessions(run_dir, cohort, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["export", str(run_dir), "--out", str(out), "--data-root", str(cohort)]
    assert main(args) == 0
    said = capsys.readouterr().out
    qc = json.loads((out / "model.json").read_text())["qc"]
    assert qc["n_sessions"] == 1 and qc["quantile"] == 0.95
    assert qc["source"] == str((run_dir / VAL_SESSIONS_FILE).resolve())
    assert qc["threshold"] == pytest.approx(next(iter(qc["scores"].values())))
    line = f"QC threshold {qc['threshold']:.4f} from the 1 validation sessions of the run"
    assert f"{line} (95th percentile)" in said and describe_qc(qc) in said

    assert main([*args, "--no-calibrate-qc"]) == 0
    assert "QC threshold" not in capsys.readouterr().out
    assert "qc" not in json.loads((out / "model.json").read_text())


def test_export_without_the_recorded_images_says_why_and_succeeds(
    run_dir, cohort, manifest, tmp_path, capsys
):
    moved = _copy_run(run_dir, tmp_path / "run")
    recorded = pd.read_csv(moved / VAL_SESSIONS_FILE, sep="\t")
    recorded["t2w"] = str(tmp_path / "gone_T2w.nii.gz")
    recorded.to_csv(moved / VAL_SESSIONS_FILE, sep="\t", index=False)
    out = tmp_path / "model"
    with pytest.warns(NeonbWarning, match="QC threshold not calibrated: .*gone_T2w.nii.gz"):
        export_run(moved, out, data_root=cohort)
    assert "qc" not in json.loads((out / "model.json").read_text())

    args = ["export", str(moved), "--out", str(out), "--data-root", str(cohort)]
    assert main(args) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "QC threshold not calibrated" in line]
    assert len(lines) == 1 and "gone_T2w.nii.gz" in lines[0]
    with pytest.raises(DataError, match="gone_T2w"):  # asked for explicitly: an error
        export_run(moved, out, data_root=cohort, calibrate_qc=True)

    (moved / VAL_SESSIONS_FILE).unlink()  # a run trained before runs recorded them
    with pytest.warns(NeonbWarning, match="records no validation sessions"):
        export_run(moved, out, data_root=cohort)

    tsv = tmp_path / "validation.tsv"  # --calibrate-qc SESSIONS overrides
    manifest[["participant_id", "session_id", "scan_age", "t1w", "t2w"]].iloc[2:].to_csv(
        tsv, sep="\t", index=False
    )
    assert main([*args, "--calibrate-qc", str(tsv)]) == 0
    assert f"from the 2 sessions of {tsv.resolve()} (95th percentile)" in capsys.readouterr().out
