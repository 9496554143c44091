"""Tests of neonb.robustness (shifted test scans) on a tiny crafted head."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neonb import plots, robustness
from neonb.data import read_tsv
from neonb.errors import ConfigError, DataError
from neonb.robustness import (
    SEVERITIES,
    SHIFTED_COLUMNS,
    SHIFTS,
    shift_session,
    shifted_records,
    write_shifted_sessions,
)
from neonb.segmentation import read_batch

SHAPE = (24, 24, 24)
SPACING = (1.0, 1.0, 1.0)
AFFINE = np.array([[-1.0, 0, 0, 12.0], [0, 1.0, 0, -10.0], [0, 0, 1.0, -11.0], [0, 0, 0, 1.0]])
T2W = {1: 1.0, 2: 0.42, 3: 0.7, 4: 0.3, 5: 0.97, 7: 0.4}
T1W = {1: 0.12, 2: 0.5, 3: 0.35, 4: 0.8, 5: 0.12, 7: 0.6}
"""Tissue intensities of the crafted head (a neonate's: WM brighter than cGM on T2w)."""


def _head():
    """Labels (nested shells: dGM, WM, cGM, CSF, non-brain, ventricles) and T1w, T2w."""
    i, j, k = np.indices(SHAPE)
    r = np.sqrt((i - 11.5) ** 2 + (j - 11.5) ** 2 + (k - 11.5) ** 2)
    label = np.select([r < 3, r < 6.5, r < 8, r < 9, r < 11], [7, 3, 2, 1, 4], 0).astype(np.uint8)
    label[(label == 3) & (i < 8)] = 5
    rng = np.random.default_rng(1)
    images = {}
    for key, table in (("t1w", T1W), ("t2w", T2W)):
        lut = np.zeros(10, np.float32)
        for value, intensity in table.items():
            lut[value] = 1000.0 * intensity
        image = lut[label] + rng.normal(0.0, 10.0, SHAPE).astype(np.float32)
        images[key] = np.where(label > 0, np.abs(image), 0.0).astype(np.float32)
    return images, label


def _correlation(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


@pytest.mark.parametrize("kind", SHIFTS)
def test_every_shift_keeps_the_grid_and_grows_with_severity(kind):
    images, label = _head()
    head = label > 0
    correlations = []
    for severity in (0.0, *SEVERITIES[kind]):
        out = shift_session(images, label, SPACING, kind, severity, seed=3)
        assert set(out) == {"t1w", "t2w"}
        for image in out.values():
            assert image.shape == SHAPE and image.dtype == np.float32
            assert np.all(image[~head] == 0) and np.all(image[head] > 0)
        correlations.append(_correlation(out["t2w"], images["t2w"], head))
    assert correlations[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(correlations, correlations[1:], strict=False)), correlations


@pytest.mark.parametrize("kind", ["scanner", "bias", "motion", "noise"])
def test_random_shifts_are_seeded(kind):
    images, label = _head()
    severity = SEVERITIES[kind][-1]
    a = shift_session(images, label, SPACING, kind, severity, seed=1)
    b = shift_session(images, label, SPACING, kind, severity, seed=1)
    c = shift_session(images, label, SPACING, kind, severity, seed=2)
    np.testing.assert_array_equal(a["t2w"], b["t2w"])
    assert not np.allclose(a["t2w"], c["t2w"])
    # each image has its own stream: the T2w draw does not depend on the T1w being there
    alone = shift_session({"t2w": images["t2w"]}, label, SPACING, kind, severity, seed=1)
    np.testing.assert_array_equal(alone["t2w"], a["t2w"])


def test_age_contrast_removes_then_inverts_white_grey_contrast():
    images, label = _head()
    core = (label == 3) & (np.abs(np.indices(SHAPE)[0] - 11.5) < 2)  # WM away from borders

    def contrast(severity):
        t2w = shift_session(images, label, SPACING, "age_contrast", severity, seed=0)["t2w"]
        return np.median(t2w[core]) - np.median(t2w[label == 2])

    before = contrast(0.0)
    assert before > 200
    # cGM borders take part of the change (partial volume), hence the margins
    assert abs(contrast(1.0)) < 0.25 * before
    assert contrast(1.5) < -0.25 * before


def test_thick_slices_blur_along_z_only():
    images, label = _head()
    out = shift_session(images, label, SPACING, "thick_slices", 5.0, seed=0)["t2w"]
    head = label > 0
    in_plane = np.abs(np.diff(out, axis=0))[head[1:] & head[:-1]].mean()
    through = np.abs(np.diff(out, axis=2))[head[..., 1:] & head[..., :-1]].mean()
    assert through < 0.6 * in_plane


def test_noise_level_follows_the_brain_intensity():
    images, label = _head()
    flat = {"t2w": np.where(label > 0, 1000.0, 0.0).astype(np.float32)}
    out = shift_session(flat, label, SPACING, "noise", 0.1, seed=0)["t2w"]
    # the brain tissue (labels 2, 3, 7) is at 1000: the added noise SD is about 100
    assert np.std(out[label == 3]) == pytest.approx(100.0, rel=0.15)


@pytest.mark.parametrize(
    ("kind", "severity", "error", "match"),
    [
        ("blur", 1.0, ConfigError, "unknown shift 'blur'"),
        ("noise", -0.1, ConfigError, "at least 0"),
        ("noise", float("nan"), ConfigError, "finite"),
        ("noise", "strong", ConfigError, "must be a number"),
        ("motion", 0.6, ConfigError, "motion must be at most 0.5"),
    ],
)
def test_bad_shift_raises(kind, severity, error, match):
    images, label = _head()
    with pytest.raises(error, match=match):
        shift_session(images, label, SPACING, kind, severity, seed=0)


def test_mismatched_shapes_raise():
    images, label = _head()
    with pytest.raises(ValueError, match="share one 3D shape"):
        shift_session(images, label[:-1], SPACING, "noise", 0.1, seed=0)
    with pytest.raises(ValueError, match="at least one image"):
        shift_session({}, label, SPACING, "noise", 0.1, seed=0)


# --- files ---------------------------------------------------------------------------------


def _records(tmp_path, n=2):
    images, label = _head()
    records = []
    for s in range(n):
        folder = tmp_path / "release" / f"sub-P{s}" / "ses-1" / "anat"
        folder.mkdir(parents=True)
        record = {"participant_id": f"P{s}", "session_id": "1", "scan_age": 38.0 + s}
        for key, array in (*images.items(), ("label", label)):
            path = folder / f"sub-P{s}_ses-1_{key}.nii.gz"
            nib.save(nib.Nifti1Image(array, AFFINE), path)
            record[key] = str(path)
        records.append(record)
    return records


SMALL = {"noise": (0.1, 0.05), "thick_slices": (3.0, 0.0)}


def test_write_shifted_sessions_writes_images_and_a_batch_table(tmp_path):
    records = _records(tmp_path)
    out = tmp_path / "shifted"
    table = write_shifted_sessions(records, SMALL, out, seed=0, progress=False)
    assert list(table.columns) == list(SHIFTED_COLUMNS)
    assert len(table) == 2 * (1 + 2 + 1)
    first = table[table["participant_id"] == "P0"]
    assert list(first["shift"]) == ["none", "noise", "noise", "thick_slices"]
    assert list(first["severity"]) == [0.0, 0.05, 0.1, 3.0]
    assert list(first["level"]) == [0, 1, 2, 1]
    clean = first.iloc[0]
    assert clean["t2w"] == records[0]["t2w"] and clean["session_id"] == "1"
    row = first.iloc[1]
    assert row["session_id"] == "1noise0p05" and row["source_session_id"] == "1"
    assert row["t2w"].endswith("sub-P0/ses-1/anat/sub-P0_ses-1_desc-noise0p05_T2w.nii.gz")
    assert row["label"] == row["dseg"] == records[0]["label"]
    source = nib.load(records[0]["t2w"])
    for key in ("t1w", "t2w"):
        shifted = nib.load(row[key])
        np.testing.assert_allclose(shifted.affine, source.affine)
        data = np.asarray(shifted.dataobj)
        assert data.dtype == np.float32 and data.shape == SHAPE
        assert not np.allclose(data, np.asarray(nib.load(records[0][key]).dataobj))
    # the TSV on disk is the table, and neonb segment's batch reader takes it
    on_disk = read_tsv(out / "shifted.tsv")
    assert list(on_disk.columns) == list(SHIFTED_COLUMNS)
    batch = read_batch(out / "shifted.tsv")
    assert len(batch) == len(table) and (batch["problem"] == "").all()
    assert list(batch["dseg"]) == list(table["dseg"])
    records_back = shifted_records(out / "shifted.tsv")
    assert records_back[1]["session_id"] == "1noise0p05" and records_back[1]["severity"] == 0.05
    assert set(records_back[0]) >= {"t1w", "t2w", "label", "scan_age", "participant_id"}


def test_write_shifted_sessions_resumes_without_redoing(tmp_path, monkeypatch):
    records = _records(tmp_path, n=1)
    out = tmp_path / "shifted"
    table = write_shifted_sessions(records, SMALL, out, seed=0, progress=False)
    stamps = {p: nib.load(p).get_fdata().sum() for p in table["t2w"][1:]}
    calls = []
    original = robustness.shift_session

    def counting(*args, **kwargs):
        calls.append(args[3:5])
        return original(*args, **kwargs)

    monkeypatch.setattr(robustness, "shift_session", counting)
    again = write_shifted_sessions(records, SMALL, out, seed=0, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again, table)
    # a new level is made alone, and the others' files are left as they were
    write_shifted_sessions(records, {**SMALL, "noise": (0.05, 0.1, 0.2)}, out, progress=False)
    assert calls == [("noise", 0.2)]
    assert {p: nib.load(p).get_fdata().sum() for p in stamps} == stamps
    # a lost file is redone; another seed redoes everything
    lost = table["t2w"].iloc[2]
    (out / lost).unlink()
    calls.clear()
    write_shifted_sessions(records, SMALL, out, seed=0, progress=False)
    assert calls == [("noise", 0.1)]
    calls.clear()
    write_shifted_sessions(records, SMALL, out, seed=1, progress=False)
    assert len(calls) == 3


def test_severity_levels_share_one_draw(tmp_path):
    """Seeds depend on the session and the kind, not on the level."""
    records = _records(tmp_path, n=2)
    table = write_shifted_sessions(records, SMALL, tmp_path / "out", seed=0, progress=False)
    noise = table[table["shift"] == "noise"]
    assert noise.groupby("participant_id")["seed"].nunique().eq(1).all()
    assert noise["seed"].nunique() == 2


def test_write_shifted_sessions_checks_its_inputs(tmp_path):
    records = _records(tmp_path, n=1)
    with pytest.raises(ConfigError, match="unknown shift"):
        write_shifted_sessions(records, {"warp": (1.0,)}, tmp_path / "a", progress=False)
    missing = [{**records[0], "t2w": str(tmp_path / "nope.nii.gz")}]
    with pytest.raises(DataError, match="nope.nii.gz: t2w image not found"):
        write_shifted_sessions(missing, SMALL, tmp_path / "b", progress=False)


def test_shift_gallery_has_a_row_per_shift_and_a_column_per_level(tmp_path):
    records = _records(tmp_path, n=1)
    table = write_shifted_sessions(records, SMALL, tmp_path / "out", progress=False)
    fig = plots.shift_gallery(table, view="coronal")
    assert len(fig.data) == 2 * 3 - 1  # two rows of clean + levels; thick slices has one level
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:3] == ["clean", "noise 0.05", "noise 0.1"]
    assert np.shape(fig.data[0].z) == (SHAPE[2], SHAPE[0])
    with pytest.raises(ValueError, match="no session"):
        plots.shift_gallery(table, participant_id="nobody")
