"""Inputs from the wild (issue 19): every case of the issue, crafted tiny in the test.

The model here is built, not trained: a small DynUNet whose weights are all zero but the
output bias, so that it labels every voxel inside the head's bounding box with one class
(2, cortical grey matter; or 4, inner background, for a model that finds no brain). Its
answers are therefore known exactly, and the tests run in about a second each.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_model

from neonb import data
from neonb.cli import main
from neonb.errors import DataError, NeonbWarning
from neonb.export import NORMALISATION, load_exported_model
from neonb.files import default_file_mode, exclusive_lock
from neonb.labels import label_table
from neonb.models import ModelConfig, build_model
from neonb.phantom import write_cohort
from neonb.segmentation import BATCH_LOCK_FILE, BATCH_SUMMARY_FILE, segment_scan

CORTEX = 2
"""The class the constant model predicts inside the head."""


def _metadata(channels=("t2w",), **changes) -> dict:
    config = ModelConfig(
        in_channels=len(channels), strides=(1, 2, 2), filters=(4, 8, 16), deep_supr_num=1
    )
    metadata = {
        "format": "neonb-model",
        "format_version": 1,
        "architecture": "DynUNet",
        "model": config.to_dict(),
        "age_head": None,
        "input_channels": list(channels),
        "labels": label_table().to_dict(orient="records"),
        "patch_size": [16, 16, 16],
        "overlap": 0.25,
        "normalisation": NORMALISATION,
        "voxel_size_mm": [1.0, 1.0, 1.0],
        "orientation": "RAS",
    }
    return metadata | changes


def _write_model(folder: Path, label: int = CORTEX, metadata: dict | None = None) -> Path:
    """A model folder whose network labels the whole head box with ``label``."""
    metadata = metadata or _metadata()
    net = build_model(ModelConfig.from_dict(_metadata()["model"]))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        net.output_block.conv.conv.bias[label] = 5.0
    folder.mkdir(parents=True, exist_ok=True)
    save_model(net, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _write_model(tmp_path_factory.mktemp("model") / "cortex")


def _head(shape=(12, 12, 12)) -> np.ndarray:
    """A box of intensity 100 inside a zero background: 8³ head voxels in a 12³ image."""
    volume = np.zeros(shape, np.float32)
    volume[tuple(slice(2, n - 2) for n in shape)] = 100.0
    return volume


def _craft(path: Path, volume: np.ndarray, affine=None, **fields) -> Path:
    """Write a NIfTI-1 file, then overwrite raw header fields (as a broken writer would)."""
    raw = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine).to_bytes()
    header = nib.Nifti1Header(binaryblock=raw[:348])
    for key, value in fields.items():
        if key[-1].isdigit():  # pixdim1, dim3: one entry of an array field
            header[key[:-1]][int(key[-1])] = value
        else:
            header[key] = value
    raw = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _segment(model: Path, out: Path, *args: str, capsys) -> tuple[int, str, str]:
    status = main(["segment", "--model", str(model), "--out", str(out), *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


def _assert_one_line_error(status: int, err: str, *words: str) -> None:
    assert status == 1
    assert err.startswith("neonb segment: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


# --------------------------------------------------------------------------------------
# 1. Wrong volumes: one source of truth for the voxel size, and a warning
# --------------------------------------------------------------------------------------


def test_volumes_come_from_the_affine_and_pixdim_disagreement_is_a_warning(
    model_dir, tmp_path, capsys
):
    good = _craft(tmp_path / "sub-good_T2w.nii.gz", _head())
    liar = _craft(tmp_path / "sub-liar_T2w.nii.gz", _head(), pixdim1=1.5, pixdim2=1.5, pixdim3=1.5)
    status, _, err = _segment(model_dir, tmp_path / "a", "--t2", str(good), capsys=capsys)
    assert status == 0 and err == ""
    status, _, err = _segment(model_dir, tmp_path / "b", "--t2", str(liar), capsys=capsys)
    assert status == 0
    assert err.startswith(f"neonb segment: warning: {liar}: pixdim gives 1.5 x 1.5 x 1.5 mm")
    assert "\n" not in err and "the sform gives 1 x 1 x 1 mm" in err

    labels_a = np.asarray(nib.load(tmp_path / "a" / "sub-good_desc-neonb_dseg.nii.gz").dataobj)
    labels_b = np.asarray(nib.load(tmp_path / "b" / "sub-liar_desc-neonb_dseg.nii.gz").dataobj)
    n_cortex = int((labels_b == CORTEX).sum())
    assert np.array_equal(labels_a, labels_b) and n_cortex >= 8**3
    for folder, name in (("a", "good"), ("b", "liar")):
        volumes = pd.read_csv(tmp_path / folder / f"sub-{name}_desc-neonb_volumes.tsv", sep="\t")
        assert volumes.loc[CORTEX, "volume_ml"] == pytest.approx(n_cortex * 1.0 / 1000)  # 1 mm³
    sidecar = json.loads((tmp_path / "b" / "sub-liar_desc-neonb_dseg.json").read_text())
    assert len(sidecar["Warnings"]) == 1 and "pixdim" in sidecar["Warnings"][0]


def test_sform_and_qform_that_disagree_give_a_warning(tmp_path):
    path = _craft(tmp_path / "x_T2w.nii.gz", _head(), qform_code=1, qoffset_x=5.0)
    image = data.load_nifti(path)
    assert data.geometry_warnings(image) == [
        "the sform and the qform disagree by up to 5 mm; neonb uses the sform (as nibabel does)"
    ]
    consistent = data.load_nifti(_craft(tmp_path / "y_T2w.nii.gz", _head(), qform_code=1))
    assert data.geometry_warnings(consistent) == []


def test_the_library_issues_header_warnings_as_neonb_warnings(model_dir, tmp_path):
    liar = _craft(tmp_path / "liar_T2w.nii.gz", _head(), pixdim1=2.0)
    with pytest.warns(NeonbWarning, match="pixdim gives 2 x 1 x 1 mm"):
        result = segment_scan(model_dir, liar, tmp_path / "out", device="cpu")
    assert result.warnings and str(liar) in result.warnings[0]


# --------------------------------------------------------------------------------------
# 2. No output replaces an input
# --------------------------------------------------------------------------------------


def _collide_same_path(tmp: Path) -> tuple[Path, Path]:
    folder = tmp / "scans"
    folder.mkdir()
    t2w = _craft(folder / "sub-02_ses-1_desc-neonb_dseg.nii.gz", _head())
    return t2w, folder


def _collide_symlink(tmp: Path) -> tuple[Path, Path]:
    t2w = _craft(tmp / "sub-02_ses-1_T2w.nii.gz", _head())
    out = tmp / "out"
    out.mkdir()
    (out / "sub-02_ses-1_desc-neonb_volumes.tsv").symlink_to(t2w)
    return t2w, out


def _collide_hardlink(tmp: Path) -> tuple[Path, Path]:
    t2w = _craft(tmp / "sub-02_ses-1_T2w.nii.gz", _head())
    out = tmp / "out"
    out.mkdir()
    os.link(t2w, out / "sub-02_ses-1_desc-neonb_qc.png")
    return t2w, out


@pytest.mark.parametrize("collide", [_collide_same_path, _collide_symlink, _collide_hardlink])
def test_an_output_never_replaces_an_input(collide, model_dir, tmp_path, capsys):
    t2w, out = collide(tmp_path)
    before = t2w.read_bytes()
    listing = sorted(out.iterdir())
    status, _, err = _segment(model_dir, out, "--t2", str(t2w), capsys=capsys)
    _assert_one_line_error(status, err, str(t2w), "is an input, and the output")
    assert t2w.read_bytes() == before and sorted(out.iterdir()) == listing


def test_a_batch_output_never_replaces_an_input(model_dir, tmp_path, capsys):
    _craft(tmp_path / "t2.nii.gz", _head())
    out = tmp_path / "out"
    out.mkdir()
    tsv = out / "volumes.tsv"  # the batch's own gathered table would replace it
    tsv.write_text("participant_id\tsession_id\tt2w\tscan_age\n1\t1\t../t2.nii.gz\t40\n")
    status, _, err = _segment(model_dir, out, "--batch", str(tsv), capsys=capsys)
    _assert_one_line_error(status, err, str(tsv), "is an input")
    assert sorted(p.name for p in out.iterdir()) == ["volumes.tsv"]


# --------------------------------------------------------------------------------------
# 3. Values beyond float32, and results without brain
# --------------------------------------------------------------------------------------


def test_values_beyond_float32_are_refused(model_dir, tmp_path, capsys):
    volume = _head().astype(np.float64)
    volume[5, 5, 5] = 1e39  # finite as float64, inf as float32
    path = _craft(tmp_path / "big_T2w.nii.gz", volume)
    out = tmp_path / "out"
    status, _, err = _segment(model_dir, out, "--t2", str(path), capsys=capsys)
    _assert_one_line_error(status, err, str(path), "1 voxel beyond the float32 range (e.g. 1e+39)")
    assert not out.exists()


def test_a_result_without_brain_is_refused(tmp_path, capsys):
    model = _write_model(tmp_path / "background-model", label=4)  # inner background
    path = _craft(tmp_path / "sub-1_T2w.nii.gz", _head())
    out = tmp_path / "deep" / "out"
    status, _, err = _segment(model, out, "--t2", str(path), capsys=capsys)
    _assert_one_line_error(status, err, str(path), "the model labelled no brain tissue")
    assert not (tmp_path / "deep").exists()  # no empty output folder left behind


# --------------------------------------------------------------------------------------
# 4. TSVs whose rows do not fit their header
# --------------------------------------------------------------------------------------


def _release(root: Path, participants: str, sessions: str) -> Path:
    (root / "sub-1" / "ses-1" / "anat").mkdir(parents=True)
    (root / "sub-2" / "ses-1" / "anat").mkdir(parents=True)
    (root / "participants.tsv").write_text(participants)
    for pid in ("1", "2"):
        (root / f"sub-{pid}" / f"sub-{pid}_sessions.tsv").write_text(sessions)
    return root


def test_a_ragged_participants_row_is_reported_with_its_line(tmp_path, capsys):
    participants = "participant_id\tbirth_age\tsex\n1\t40\tF\textra\n2\t35\tM\n"
    root = _release(tmp_path / "rel", participants, "session_id\tscan_age\n1\t41\n")
    status = main(["manifest", str(root)])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err
    assert f"{root / 'participants.tsv'}: line 2: expected 3 fields, found 4" in err
    good = "participant_id\tbirth_age\tsex\n1\t40\tF\n2\t35\tM\n"
    manifest = data.read_manifest(_release(tmp_path / "ok", good, "session_id\tscan_age\n1\t41\n"))
    assert manifest["birth_age"].tolist() == [40.0, 35.0] and manifest["preterm"].tolist() == [
        False,
        True,
    ]


def test_trailing_empty_cells_of_a_spreadsheet_are_not_a_ragged_row(tmp_path):
    participants = "participant_id\tbirth_age\tsex\n1\t40\tF\t\t\n2\t35\tM\n"
    root = _release(tmp_path / "rel", participants, "session_id\tscan_age\n1\t41\t\n")
    manifest = data.read_manifest(root, progress=False)
    assert manifest["birth_age"].tolist() == [40.0, 35.0]
    assert manifest["scan_age"].tolist() == [41.0, 41.0]


def test_a_ragged_sessions_row_is_reported_for_its_subject(tmp_path):
    good = "participant_id\tbirth_age\tsex\n1\t40\tF\n2\t35\tM\n"
    root = _release(tmp_path / "rel", good, "session_id\tscan_age\n1\t41\t7\n")
    manifest = data.read_manifest(root, progress=False)
    assert manifest["scan_age"].isna().all()
    assert "line 2: expected 2 fields, found 3" in manifest["reason"].iloc[0]


def test_a_ragged_batch_row_is_one_line(model_dir, tmp_path, capsys):
    _craft(tmp_path / "t2.nii.gz", _head())
    tsv = tmp_path / "batch.tsv"
    tsv.write_text(
        "participant_id\tsession_id\tt2w\tscan_age\n1\t1\tt2.nii.gz\t40\n2\t1\tt2.nii.gz\t40\tx\n"
    )
    out = tmp_path / "out"
    status, _, err = _segment(model_dir, out, "--batch", str(tsv), capsys=capsys)
    _assert_one_line_error(status, err, f"{tsv}: line 3: expected 4 fields, found 5")
    assert not out.exists()


# --------------------------------------------------------------------------------------
# 5. Size limits, from the header and the model description, before allocating
# --------------------------------------------------------------------------------------


def test_a_header_claiming_1024_cubed_voxels_is_refused_before_reading(model_dir, tmp_path, capsys):
    zeros = np.zeros((2, 2, 2), np.float32)
    path = _craft(tmp_path / "bomb_T2w.nii.gz", zeros, dim1=1024, dim2=1024, dim3=1024)
    status, _, err = _segment(model_dir, tmp_path / "out", "--t2", str(path), capsys=capsys)
    words = "dim (1024, 1024, 1024) makes 1073741824 voxels: neonb reads at most"
    _assert_one_line_error(status, err, str(path), words)


def test_a_gzip_stream_longer_than_the_header_says_is_not_read_to_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_TRAILING_BYTES", 2**20)
    raw = nib.Nifti1Image(_head(), np.eye(4)).to_bytes()
    path = tmp_path / "long_T2w.nii.gz"
    path.write_bytes(gzip.compress(raw + bytes(4 * 2**20)))  # 4 MiB of zeros after the data
    with pytest.raises(DataError, match="holds more than 1 MiB beyond the"):
        data.load_nifti(path)
    path.write_bytes(gzip.compress(raw + bytes(1000)))  # a little padding is fine
    assert data.load_nifti(path).shape == (12, 12, 12)


def test_resampling_to_a_huge_grid_is_refused(tmp_path, capsys):
    model = _write_model(
        tmp_path / "fine-model", metadata=_metadata(voxel_size_mm=[0.001, 0.001, 0.001])
    )
    path = _craft(tmp_path / "x_T2w.nii.gz", _head())
    status, _, err = _segment(model, tmp_path / "out", "--t2", str(path), capsys=capsys)
    _assert_one_line_error(status, err, str(path), "would make 1728000000000 voxels")


# --------------------------------------------------------------------------------------
# 6. Batch ids must be BIDS labels
# --------------------------------------------------------------------------------------


def test_batch_ids_that_are_not_bids_labels_fail_their_session_only(model_dir, tmp_path, capsys):
    _craft(tmp_path / "t2.nii.gz", _head())
    rows = [("good1", "1"), ("../../../x", "1"), ("", "1"), ("a/b", "1"), ("good2", "a b")]
    tsv = tmp_path / "batch.tsv"
    tsv.write_text(
        "participant_id\tsession_id\tt2w\tscan_age\n"
        + "".join(f"{pid}\t{sid}\tt2.nii.gz\t40\n" for pid, sid in rows)
    )
    out = tmp_path / "deep" / "er" / "out"
    status, _, err = _segment(model_dir, out, "--batch", str(tsv), capsys=capsys)
    assert status == 1 and "4 of 5 sessions failed" in err.splitlines()[-1]
    summary = pd.read_csv(out / BATCH_SUMMARY_FILE, sep="\t", keep_default_na=False)
    assert summary["status"].tolist() == ["done", "failed", "failed", "failed", "failed"]
    assert "participant_id '../../../x' (row 3) is not a BIDS label" in summary["message"][1]
    assert "participant_id '' (row 4) is not a BIDS label" in summary["message"][2]
    assert "session_id 'a b' (row 6) is not a BIDS label" in summary["message"][4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.tsv", "deep", "t2.nii.gz"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-good1"]


# --------------------------------------------------------------------------------------
# 7. One line, naming the file and the field, instead of a traceback
# --------------------------------------------------------------------------------------

NAN = float("nan")
ZERO_ROW = [0.0, 0.0, 0.0, 0.0]

BROKEN_IMAGES = {
    "nan_pixdim": ({"pixdim1": NAN}, _head(), "pixdim holds voxel sizes [nan, 1, 1]"),
    "nan_sform": ({"srow_x": [NAN, 0, 0, 0]}, _head(), "the sform (srow_x, srow_y, srow_z) holds"),
    "zero_sform": (
        {"srow_x": ZERO_ROW, "srow_y": ZERO_ROW, "srow_z": ZERO_ROW},
        _head(),
        "the sform (srow_x, srow_y, srow_z) is singular (rank 0)",
    ),
    "rank_deficient_sform": (
        {"srow_y": [1.0, 0, 0, 0]},
        _head(),
        "the sform (srow_x, srow_y, srow_z) is singular (rank 2)",
    ),
    "nan_qform": (
        {"sform_code": 0, "qform_code": 1, "quatern_b": NAN},
        _head(),
        "the qform (quatern_b/c/d, qoffset_x/y/z, pixdim) holds NaN",
    ),
    "one_voxel": ({}, np.ones((1, 1, 1), np.float32), "has shape (1, 1, 1): fewer than 4 voxels"),
    "complex64": ({}, _head().astype(np.complex64), "has complex voxels of type complex64"),
}


@pytest.mark.parametrize("case", list(BROKEN_IMAGES))
def test_a_broken_header_or_voxel_type_is_one_line(case, model_dir, tmp_path, capsys):
    fields, volume, words = BROKEN_IMAGES[case]
    path = _craft(tmp_path / f"{case}_T2w.nii.gz", volume, **fields)
    out = tmp_path / "out"
    status, _, err = _segment(model_dir, out, "--t2", str(path), capsys=capsys)
    _assert_one_line_error(status, err, f"{path}: {words}")
    assert not out.exists()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BROKEN_MODELS = {
    "patch_size_as_text": ({"patch_size": ["16", "16", "16"]}, "'patch_size' must be three"),
    "overlap_as_text": ({"overlap": "0.25"}, "'overlap' must be a number in [0, 1)"),
    "unknown_orientation": ({"orientation": "XYZ"}, "'orientation' must be three axis codes"),
    "unknown_channel": ({"input_channels": ["flair"]}, "'input_channels' must be"),
    "unknown_image_kind": ({"input_images": "raw"}, "'input_images' must be 'restore' or"),
    "empty_label_table": ({"labels": []}, "'labels' must be a non-empty list"),
    "age_head_on_a_plain_network": ({"age_head": {"hidden": 8}}, "'age_head' must be null"),
    "two_voxel_sizes": ({"voxel_size_mm": [1.0, 1.0]}, "'voxel_size_mm' must be three"),
    "zero_voxel_size": ({"voxel_size_mm": [0, 1, 1]}, "'voxel_size_mm' must be three"),
    "negative_voxel_size": ({"voxel_size_mm": [1, -1, 1]}, "'voxel_size_mm' must be three"),
    "nan_voxel_size": ({"voxel_size_mm": [1, NAN, 1]}, "'voxel_size_mm' must be three"),
    "huge_filters": (
        {"model": {**_metadata()["model"], "filters": [4, 8, 100000]}},
        "'model.filters' must be at most 2048",
    ),
    "huge_patch": ({"patch_size": [1024, 1024, 1024]}, "'patch_size' must be three whole numbers"),
    "filters_as_text": (
        {"model": {**_metadata()["model"], "filters": "many"}},
        "describes an invalid network",
    ),
    "nested_json": (None, "is not readable JSON: nested too deeply"),
}


@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_a_bad_model_description_is_one_line_naming_the_field(case, tmp_path, capsys):
    changes, words = BROKEN_MODELS[case]
    folder = _write_model(tmp_path / "model")
    text = _nested(100_000) if changes is None else json.dumps(_metadata(**changes))
    (folder / "model.json").write_text(text)
    path = _craft(tmp_path / "x_T2w.nii.gz", _head())
    out = tmp_path / "out"
    status, _, err = _segment(folder, out, "--t2", str(path), capsys=capsys)
    _assert_one_line_error(status, err, str(folder / "model.json"), words)
    assert not out.exists()


def test_the_model_description_checks_accept_an_export(model_dir):
    assert load_exported_model(model_dir).voxel_size_mm == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------------
# 8. Phantom file modes, special files, concurrent batches
# --------------------------------------------------------------------------------------


def test_phantom_files_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        root = write_cohort(tmp_path / "cohort", n=1, seed=0, voxel_size=8.0, progress=False)
        assert default_file_mode() == 0o644
    finally:
        os.umask(previous)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_fifo_or_a_link_to_a_device_is_refused_before_reading(model_dir, tmp_path, capsys):
    fifo = tmp_path / "pipe_T2w.nii"
    os.mkfifo(fifo)  # opening it for reading would block forever
    status, _, err = _segment(model_dir, tmp_path / "out", "--t2", str(fifo), capsys=capsys)
    _assert_one_line_error(status, err, f"{fifo}: is a named pipe (FIFO), not a regular file")
    zero = tmp_path / "zero_T2w.nii.gz"
    zero.symlink_to("/dev/zero")  # reading it would never end
    status, _, err = _segment(model_dir, tmp_path / "out", "--t2", str(zero), capsys=capsys)
    _assert_one_line_error(status, err, f"{zero}: is a link to /dev/zero, a character device")


def _one_session_batch(tmp: Path) -> Path:
    _craft(tmp / "t2.nii.gz", _head())
    tsv = tmp / "batch.tsv"
    tsv.write_text("participant_id\tsession_id\tt2w\tscan_age\n1\t1\tt2.nii.gz\t40\n")
    return tsv


def test_a_second_batch_into_the_same_folder_is_refused(model_dir, tmp_path, capsys):
    tsv = _one_session_batch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    lock = out / BATCH_LOCK_FILE
    with exclusive_lock(lock, "a test"):  # what a running batch holds
        status, _, err = _segment(model_dir, out, "--batch", str(tsv), capsys=capsys)
        _assert_one_line_error(status, err, str(lock), f"still running (process {os.getpid()})")
        assert sorted(p.name for p in out.iterdir()) == [BATCH_LOCK_FILE]
    assert not lock.exists()


def test_a_stale_batch_lock_is_taken_over(model_dir, tmp_path, capsys):
    tsv = _one_session_batch(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / BATCH_LOCK_FILE).write_text("999999999\n")  # left by a process that died
    status, stdout, _ = _segment(model_dir, out, "--batch", str(tsv), capsys=capsys)
    assert status == 0 and "1 segmented" in stdout
    assert not (out / BATCH_LOCK_FILE).exists()
