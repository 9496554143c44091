"""Every bad input to ``neonb segment``: a one-line error naming the file, exit 1, no output.

Each case builds one broken input from a good synthetic session and runs the command; the
test asserts the message's first line is the only line, that it names the offending file and
the problem, that the exit status is 1 and that the output folder holds no file, temporary
ones included.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neonb import data
from neonb.cli import main
from neonb.experiment import TrainingConfig, train_segmentation
from neonb.export import export_run
from neonb.phantom import write_cohort

TINY = {
    "patch_size": [16, 16, 16],
    "epochs": 1,
    "batch_size": 2,
    "model": {"strides": [1, 2, 2], "filters": [4, 8, 16], "deep_supr_num": 1},
}


@dataclass(frozen=True)
class Session:
    t1w: Path
    t2w: Path
    dseg: Path
    participant_id: str
    session_id: str
    scan_age: float


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(
        tmp_path_factory.mktemp("cohort"), n=3, seed=4, voxel_size=6.0, progress=False
    )


@pytest.fixture(scope="module")
def model_dir(cohort, tmp_path_factory):
    records = data.to_data_dicts(data.read_manifest(cohort, progress=False))
    run = tmp_path_factory.mktemp("run")
    train_segmentation(
        records[:2], records[2:], TrainingConfig.from_dict(TINY), run, progress=False
    )
    return export_run(run, tmp_path_factory.mktemp("model") / "tiny", data_root=cohort)


@pytest.fixture()
def session(cohort, tmp_path) -> Session:
    """A private copy of one good session, free to break."""
    row = data.read_manifest(cohort, progress=False).iloc[0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    paths = {key: Path(shutil.copy(row[key], folder)) for key in ("t1w", "t2w", "dseg")}
    return Session(**paths, participant_id=row.participant_id, session_id=row.session_id,
                   scan_age=float(row.scan_age))  # fmt: skip


def _save_like(reference: Path, array: np.ndarray, path: Path, affine=None) -> Path:
    image = nib.load(reference)
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), path)
    return path


def _intensities(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def _single(s: Session, *, t2w=None, t1w=None, reference=None) -> list[str]:
    args = ["--t2", str(t2w or s.t2w), "--t1", str(t1w or s.t1w)]
    return args + (["--reference", str(reference)] if reference else [])


def _batch(tmp: Path, s: Session, rows: list[dict]) -> list[str]:
    lines = ["participant_id\tsession_id\tscan_age\tt1w\tt2w"]
    for row in rows:
        values = {"participant_id": s.participant_id, "session_id": s.session_id,
                  "scan_age": s.scan_age, "t1w": s.t1w, "t2w": s.t2w, **row}  # fmt: skip
        lines.append("\t".join(str(values[k]) for k in lines[0].split("\t")))
    tsv = tmp / "manifest.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return ["--batch", str(tsv)]


PROC_SELF = Path("/proc/self")
"""A folder in which nobody, root included, can create a file (Linux)."""

# Each case: (s, tmp) -> (arguments naming the inputs, the file the message must name,
# the words it must hold). The output folder is tmp / "out" unless the arguments give --out.
Case = Callable[[Session, Path], tuple[list[str], Path, str]]


def missing_file(s, tmp):
    missing = tmp / "sub-x_ses-1_T2w.nii.gz"
    return _single(s, t2w=missing), missing, "file not found"


def not_nifti(s, tmp):
    text = tmp / "sub-x_ses-1_T2w.nii"
    text.write_text("participant_id\tsession_id\n" * 40)
    return _single(s, t2w=text), text, "not a NIfTI file"


def corrupt_gzip(s, tmp):
    raw = bytearray(s.t2w.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 32] = bytes(b ^ 0xFF for b in raw[middle : middle + 32])
    s.t2w.write_bytes(bytes(raw))
    return _single(s), s.t2w, "corrupt gzip"


def truncated_image(s, tmp):
    whole = gzip.decompress(s.t1w.read_bytes())
    cut = tmp / "sub-x_ses-1_T1w.nii"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    return _single(s, t1w=cut), cut, "truncated: the image data needs"


def four_d_image(s, tmp):
    volume = _intensities(s.t2w)
    path = _save_like(s.t2w, np.stack([volume, volume], axis=-1), tmp / "sub-x_4d_T2w.nii.gz")
    return _single(s, t2w=path), path, "4 axes, expected a 3D image"


def shape_mismatch(s, tmp):
    path = _save_like(s.t1w, _intensities(s.t1w)[:-2], tmp / "sub-x_ses-1_T1w.nii.gz")
    return _single(s, t1w=path), path, f"differs from {tuple(nib.load(s.t2w).shape)}"


def affine_mismatch(s, tmp):
    affine = nib.load(s.t1w).affine.copy()
    affine[:3, 3] += 3.0
    path = _save_like(s.t1w, _intensities(s.t1w), tmp / "sub-x_T1w.nii.gz", affine=affine)
    return _single(s, t1w=path), path, f"affine differs from that of {s.t2w}"


def nan_intensities(s, tmp):
    volume = _intensities(s.t2w)
    volume[3, 4, 5] = np.nan
    volume[6, 7, 8] = np.inf
    path = _save_like(s.t2w, volume, tmp / "sub-x_ses-1_T2w.nii.gz")
    return _single(s, t2w=path), path, "holds 1 NaN and 1 infinite voxels"


def all_zero_image(s, tmp):
    path = _save_like(s.t1w, np.zeros(nib.load(s.t1w).shape, np.float32), tmp / "z_T1w.nii.gz")
    return _single(s, t1w=path), path, "all voxels are zero"


def labels_outside_0_9(s, tmp):
    labels = np.asarray(nib.load(s.dseg).dataobj).copy()
    labels[0, 0, :3] = 12
    path = _save_like(s.dseg, labels, tmp / "sub-x_ses-1_dseg.nii.gz")
    return _single(s, reference=path), path, "outside the labels 0-9 in 3 voxels (e.g. 12)"


def single_modality_for_a_two_channel_model(s, tmp):
    return ["--t2", str(s.t2w)], s.t2w, "needs T1w and T2w inputs, but no T1w was given"


def missing_scan_age_in_manifest(s, tmp):
    args = _batch(tmp, s, [{"scan_age": "n/a"}])
    return args, Path(args[1]), f"missing scan age for sub-{s.participant_id}"


def duplicate_subject_session(s, tmp):
    args = _batch(tmp, s, [{}, {}])
    return args, Path(args[1]), "duplicate subject/session"


def unwritable_output_folder(s, tmp):
    if not PROC_SELF.is_dir():
        pytest.skip("needs Linux's /proc")
    return [*_single(s), "--out", str(PROC_SELF)], PROC_SELF, "output folder is not writable"


def output_folder_is_a_file(s, tmp):
    blocker = tmp / "out"
    blocker.write_text("a file where the output folder should go")
    return _single(s), blocker, "output folder is a file, not a folder"


CASES: list[Case] = [
    missing_file,
    not_nifti,
    corrupt_gzip,
    truncated_image,
    four_d_image,
    shape_mismatch,
    affine_mismatch,
    nan_intensities,
    all_zero_image,
    labels_outside_0_9,
    single_modality_for_a_two_channel_model,
    missing_scan_age_in_manifest,
    duplicate_subject_session,
    unwritable_output_folder,
    output_folder_is_a_file,
]


def _output_files(out: Path) -> list[Path]:
    if out.is_file():
        return []  # the blocking file of the unwritable case is not an output
    return [p for p in out.rglob("*") if p.is_file()] if out.exists() else []


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_is_one_line_naming_the_file(case, session, model_dir, tmp_path, capsys):
    args, named, problem = case(session, tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    status = main(["segment", "--model", str(model_dir), "--out", str(out), *args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 1
    assert err.startswith("neonb segment: error: ") and "\n" not in err, err
    assert str(named) in err and problem in err, err
    assert _output_files(out) == []
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no temporary file anywhere


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_folder(session, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        status = main(["segment", *_single(session), "--model", str(model_dir), "--out", str(out)])
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert status == 1 and str(out) in err and "output folder is not writable" in err
    assert list(out.iterdir()) == []
