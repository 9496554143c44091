"""Tests of neonb.data on a tiny release in dHCP naming, broken on purpose session by session.

Every session of the fixture release trips at most one problem, so each test can assert
the exact reason of each row (nnU-Net's lesson: test every check with data that trips it).
The names are those of the dHCP third release's ``derivatives/dhcp_anat_pipeline``; the
release's own layout and counts are tested on :mod:`tests.release_fixture`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neonb.data import (
    MANIFEST_COLUMNS,
    check_binary,
    check_finite,
    check_image_3d,
    check_labels,
    check_same_affine,
    check_same_shape,
    check_session,
    find_session_images,
    load_manifest,
    load_nifti,
    read_manifest,
    reason_categories,
    session_filename,
    session_record,
    summarize_manifest,
    to_data_dicts,
    write_manifest,
)
from neonb.errors import ConfigError, DataError

SHAPE = (6, 7, 8)
AFFINE = np.diag([0.5, 0.5, 0.5, 1.0])
RESTORE = {"t1w": "desc-restore_T1w", "t2w": "desc-restore_T2w"}
LEGACY = {"t1w": "desc-restore_space-T2w_T1w", "t2w": "desc-restore_T2w"}
"""The bias-corrected pair under the T1w name neonb used before it followed the release."""
PLAIN = {"t1w": "T1w", "t2w": "T2w"}
NOT_GZIP = b"this is not gzip data at all" * 4


# --------------------------------------------------------------------------------------
# Building a release
# --------------------------------------------------------------------------------------


def _intensity(rng: np.random.Generator, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return (rng.random(shape) * 100).astype(np.float32)


def _labels(rng: np.random.Generator, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return rng.integers(0, 10, shape).astype(np.int16)


def _mask(rng: np.random.Generator, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return rng.integers(0, 2, shape).astype(np.uint8)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _tsv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def _session(
    root: Path,
    pid: str,
    sid: str,
    rng: np.random.Generator,
    *,
    names: dict[str, str] = RESTORE,
    dseg_ext: str = ".nii.gz",
    skip: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Write a consistent T1w, T2w, dseg and brain mask for one session; return their paths."""
    anat = root / f"sub-{pid}" / f"ses-{sid}" / "anat"
    paths = {
        "t1w": anat / f"sub-{pid}_ses-{sid}_{names['t1w']}.nii.gz",
        "t2w": anat / f"sub-{pid}_ses-{sid}_{names['t2w']}.nii.gz",
        "dseg": anat / f"sub-{pid}_ses-{sid}_desc-drawem9_dseg{dseg_ext}",
        "brain_mask": anat / f"sub-{pid}_ses-{sid}_desc-brain_mask.nii.gz",
    }
    draw = {"dseg": _labels, "brain_mask": _mask}
    for key, path in paths.items():
        if key not in skip:
            _save(path, draw.get(key, _intensity)(rng))
    return paths


def _build_release(root: Path) -> dict[str, dict[str, Path]]:
    """The fixture release; returns image paths by ``"<participant>/<session>"``."""
    rng = np.random.default_rng(0)
    # dHCP's own participants.tsv says gender; ids bare or prefixed; CC011 is absent
    _tsv(
        root / "participants.tsv",
        [
            {"participant_id": "CC001", "gender": "male", "birth_age": "40.0"},
            {"participant_id": "sub-CC002", "gender": "female", "birth_age": "30.5"},
            {"participant_id": "CC003", "gender": "male", "birth_age": "36.9"},
            {"participant_id": "CC004", "gender": "female", "birth_age": "37.0"},
        ]
        + [
            {"participant_id": f"CC0{i:02d}", "gender": "male", "birth_age": "39.5"}
            for i in (5, 6, 7, 8, 9, 10, 12, 99)
        ],
    )
    sessions = {
        "CC001": [("1001", "41.0")],
        "CC002": [("ses-900", "32.0"), ("ses-1000", "40.5")],
        "CC010": [("10001", "n/a"), ("10003", "40.0"), ("10004", "forty")],
    }
    sessions |= {f"CC00{i}": [(f"{i}001", "40.0")] for i in range(3, 10)}
    sessions["CC011"] = [("11001", "42.0")]
    sessions["CC013"] = [("13001", "39.0")]
    for pid, rows in sessions.items():
        _tsv(
            root / f"sub-{pid}" / f"sub-{pid}_sessions.tsv",
            [{"session_id": sid, "scan_age": age, "radiology_score": "1"} for sid, age in rows],
        )
    images = {"CC001/1001": _session(root, "CC001", "1001", rng)}
    # the release's plain pair next to the desc-restore one: each kind reads its own
    images["CC001/1001 plain"] = _session(root, "CC001", "1001", rng, names=PLAIN)
    images["CC002/900"] = _session(root, "CC002", "900", rng)
    images["CC002/1000"] = _session(root, "CC002", "1000", rng, names=LEGACY, dseg_ext=".nii")
    images["CC003/3001"] = _session(root, "CC003", "3001", rng, skip=("t1w",))
    images["CC004/4001"] = _session(root, "CC004", "4001", rng)
    images["CC004/4001"]["t2w"].write_bytes(NOT_GZIP)
    images["CC005/5001"] = _session(root, "CC005", "5001", rng)
    t1w = images["CC005/5001"]["t1w"]
    t1w.write_bytes(t1w.read_bytes()[: t1w.stat().st_size // 2])
    images["CC006/6001"] = _session(root, "CC006", "6001", rng)
    _save(images["CC006/6001"]["t1w"], _intensity(rng, (6, 7, 9)))
    images["CC007/7001"] = _session(root, "CC007", "7001", rng)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    _save(images["CC007/7001"]["dseg"], _labels(rng), shifted)
    images["CC008/8001"] = _session(root, "CC008", "8001", rng)
    labels = _labels(rng)
    labels[1, 2, 3] = 12
    _save(images["CC008/8001"]["dseg"], labels)
    images["CC009/9001"] = _session(root, "CC009", "9001", rng)
    t2w = _intensity(rng)
    t2w[0, 0, 0] = np.nan
    _save(images["CC009/9001"]["t2w"], t2w)
    for sid in ("10001", "10002", "10004"):  # 10002 has no row; 10003 has no folder
        images[f"CC010/{sid}"] = _session(root, "CC010", sid, rng)
    images["CC011/11001"] = _session(root, "CC011", "11001", rng, skip=("brain_mask",))
    images["CC012/12001"] = _session(root, "CC012", "12001", rng)  # no sessions.tsv at all
    # a bias-corrected T2w with only a plain T1w: never paired across kinds
    images["CC013/13001"] = _session(root, "CC013", "13001", rng, skip=("t1w",))
    images["CC013/13001 plain"] = _session(root, "CC013", "13001", rng, names=PLAIN, skip=("t2w",))
    return images


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("dhcp_rel3")
    return root, _build_release(root)


@pytest.fixture(scope="module")
def manifest(release) -> pd.DataFrame:
    return read_manifest(release[0], progress=False)


@pytest.fixture(scope="module")
def checked(release) -> pd.DataFrame:
    return read_manifest(release[0], check=True, progress=False)


def _row(table: pd.DataFrame, key: str) -> pd.Series:
    pid, sid = key.split("/")
    match = table[(table.participant_id == pid) & (table.session_id == sid)]
    assert len(match) == 1, key
    return match.iloc[0]


def _sessions_tsv(root: Path, pid: str) -> Path:
    return root / f"sub-{pid}" / f"sub-{pid}_sessions.tsv"


def _anat(root: Path, key: str) -> Path:
    pid, sid = key.split("/")
    return root / f"sub-{pid}" / f"ses-{sid}" / "anat"


def _expected_reasons(root: Path) -> dict[str, str]:
    """Reasons without image checks; every other session is complete."""
    cc010 = _sessions_tsv(root, "CC010")
    cc013 = _anat(root, "CC013/13001")
    return {
        "CC003/3001": (
            f"missing T1w: {_anat(root, 'CC003/3001')}/sub-CC003_ses-3001_desc-restore_T1w.nii.gz"
            " not found"
        ),
        "CC013/13001": (
            f"missing T1w: {cc013}/sub-CC013_ses-13001_desc-restore_T1w.nii.gz not found "
            "(there is sub-CC013_ses-13001_T1w.nii.gz, read with images='plain')"
        ),
        "CC010/10001": f"missing scan age: scan_age is 'n/a' in {cc010}",
        "CC010/10002": f"missing scan age: no row for session 10002 in {cc010}",
        "CC010/10003": (
            f"missing session folder: {root / 'sub-CC010' / 'ses-10003'} (listed in {cc010})"
        ),
        "CC010/10004": f"invalid scan age: 'forty' in {cc010} is not a number of weeks",
        "CC012/12001": f"missing scan age: {_sessions_tsv(root, 'CC012')} not found",
    }


# --------------------------------------------------------------------------------------
# read_manifest
# --------------------------------------------------------------------------------------


def test_manifest_lists_every_session_in_order(manifest):
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    keys = [f"{p}/{s}" for p, s in zip(manifest.participant_id, manifest.session_id, strict=True)]
    assert keys == [
        "CC001/1001",
        "CC002/900",  # numeric order: 900 before 1000
        "CC002/1000",
        "CC003/3001",
        "CC004/4001",
        "CC005/5001",
        "CC006/6001",
        "CC007/7001",
        "CC008/8001",
        "CC009/9001",
        "CC010/10001",
        "CC010/10002",
        "CC010/10003",
        "CC010/10004",
        "CC011/11001",
        "CC012/12001",
        "CC013/13001",
    ]
    # participants.tsv lists CC099, which has no folder: not a session of this download
    assert "CC099" not in set(manifest.participant_id)


def test_manifest_dtypes(manifest):
    assert manifest["scan_age"].dtype == "float64"
    assert manifest["birth_age"].dtype == "float64"
    assert manifest["preterm"].dtype == "boolean"
    assert manifest["complete"].dtype == bool
    columns = ("participant_id", "session_id", "sex", "t1w", "t2w", "dseg", "brain_mask", "reason")
    for column in columns:
        assert manifest[column].dtype == "string", column


def test_reasons_without_image_checks(release, manifest):
    root, _ = release
    expected = _expected_reasons(root)
    for _, row in manifest.iterrows():
        key = f"{row.participant_id}/{row.session_id}"
        assert row.reason == expected.get(key, ""), key
        assert row.complete == (key not in expected), key
    # a broken file still counts as present when the images are not opened
    assert _row(manifest, "CC004/4001").complete


def test_reasons_with_image_checks(release, checked):
    root, images = release
    expected = _expected_reasons(root)
    t2w = {key: paths["t2w"] for key, paths in images.items()}
    expected |= {
        "CC006/6001": (
            f"T1w shape mismatch: {images['CC006/6001']['t1w']}: shape (6, 7, 9) differs "
            f"from (6, 7, 8) of {t2w['CC006/6001']}"
        ),
        "CC007/7001": (
            f"dseg affine mismatch: {images['CC007/7001']['dseg']}: affine differs from that "
            f"of {t2w['CC007/7001']} by up to 2 mm (tolerance 0.001 mm)"
        ),
        "CC008/8001": (
            f"dseg bad labels: {images['CC008/8001']['dseg']}: holds values outside the "
            "labels 0-9 in 1 voxel (e.g. 12)"
        ),
        "CC009/9001": f"T2w not finite: {t2w['CC009/9001']}: holds 1 NaN and 0 infinite voxels",
        "CC004/4001": (
            f"T2w unreadable: {t2w['CC004/4001']}: corrupt gzip: not gzip data "
            "(starts with b'this')"
        ),
    }
    for _, row in checked.iterrows():
        key = f"{row.participant_id}/{row.session_id}"
        if key == "CC005/5001":
            prefix = f"T1w unreadable: {images[key]['t1w']}: truncated: the gzip stream ends early"
            assert row.reason.startswith(prefix)
            assert not row.complete
            continue
        assert row.reason == expected.get(key, ""), key
        assert row.complete == (key not in expected), key


def test_parallel_check_gives_the_same_manifest(release, checked):
    parallel = read_manifest(release[0], check=True, progress=False, workers=2)
    pd.testing.assert_frame_equal(parallel, checked)


def test_paths_of_the_chosen_kind_and_accepted_variants(release, manifest):
    _, images = release
    for key in ("CC001/1001", "CC002/1000"):  # CC001 also has the plain pair on disk
        row = _row(manifest, key)
        for column in ("t1w", "t2w", "dseg", "brain_mask"):
            assert row[column] == str(images[key][column])
            assert Path(row[column]).is_absolute()
    # neonb's older name of the bias-corrected T1w is still read
    assert _row(manifest, "CC002/1000").t1w.endswith("_desc-restore_space-T2w_T1w.nii.gz")
    assert _row(manifest, "CC002/1000").dseg.endswith("_desc-drawem9_dseg.nii")
    assert _row(manifest, "CC003/3001").t1w == ""
    assert _row(manifest, "CC011/11001").brain_mask == ""  # no mask: complete all the same
    assert _row(manifest, "CC013/13001").t1w == ""  # only a plain T1w: not paired
    columns = ["t1w", "t2w", "dseg", "brain_mask"]
    assert _row(manifest, "CC010/10003")[columns].tolist() == ["", "", "", ""]


def test_plain_images_are_read_as_a_pair_of_their_own(release):
    root, images = release
    plain = read_manifest(root, images="plain", progress=False)
    row = _row(plain, "CC001/1001")
    assert row.complete, row.reason
    expected = images["CC001/1001 plain"]
    assert (row.t1w, row.t2w) == (str(expected["t1w"]), str(expected["t2w"]))
    assert row.t1w.endswith("sub-CC001_ses-1001_T1w.nii.gz")
    assert row.dseg == str(images["CC001/1001"]["dseg"])  # labels and mask are shared
    # the restored pair is never taken in place of a missing plain image, nor mixed with it
    cc013 = _row(plain, "CC013/13001")
    assert cc013.reason == (
        f"missing T2w: {_anat(root, 'CC013/13001')}/sub-CC013_ses-13001_T2w.nii.gz not found "
        "(there is sub-CC013_ses-13001_desc-restore_T2w.nii.gz, read with images='restore')"
    )
    assert cc013.t1w == str(images["CC013/13001 plain"]["t1w"]) and cc013.t2w == ""
    cc002 = _row(plain, "CC002/900")
    assert reason_categories(cc002.reason) == ["missing T1w", "missing T2w"]
    assert set(plain.loc[plain.complete, "participant_id"]) == {"CC001"}


def test_brain_mask_apply_makes_the_mask_required(release):
    root, _ = release
    applied = read_manifest(root, brain_mask="apply", progress=False)
    row = _row(applied, "CC011/11001")
    mask = _anat(root, "CC011/11001") / "sub-CC011_ses-11001_desc-brain_mask.nii.gz"
    assert row.reason == f"missing brain mask: {mask} not found"
    assert not row.complete
    expected = set(_expected_reasons(root)) | {"CC011/11001"}
    assert {
        f"{r.participant_id}/{r.session_id}" for r in applied.itertuples() if not r.complete
    } == (expected)


def _mask_release(root: Path) -> dict[str, Path]:
    """Three sessions whose brain masks are good, not binary and on another grid."""
    rng = np.random.default_rng(6)
    _tsv(root / "participants.tsv", [{"participant_id": "M", "birth_age": "40"}])
    _tsv(_sessions_tsv(root, "M"), [{"session_id": s, "scan_age": "41"} for s in "123"])
    masks = {s: _session(root, "M", s, rng)["brain_mask"] for s in "123"}
    bad = _mask(rng)
    bad[0, 0, :3] = (2, 255, 2)
    _save(masks["2"], bad)
    _save(masks["3"], _mask(rng, (6, 7, 9)))
    return masks


def test_check_brain_masks_when_they_are_applied(tmp_path):
    masks = _mask_release(tmp_path)
    applied = read_manifest(tmp_path, brain_mask="apply", check=True, progress=False)
    t2w = {s: str(masks[s]).replace("desc-brain_mask", "desc-restore_T2w") for s in "23"}
    assert applied.reason.tolist() == [
        "",
        f"brain mask not binary: {masks['2']}: is not binary: holds values other than 0 and 1 "
        "in 3 voxels (e.g. 2, 255)",
        f"brain mask shape mismatch: {masks['3']}: shape (6, 7, 9) differs from (6, 7, 8) of "
        f"{t2w['3']}",
    ]
    # an ignored mask is not a reason to drop a session
    ignored = read_manifest(tmp_path, check=True, progress=False)
    assert ignored.complete.all()
    assert ignored.brain_mask.tolist() == [str(masks[s]) for s in "123"]


def test_derivatives_root_finds_tables_two_levels_up(tmp_path):
    rng = np.random.default_rng(7)
    anat_root = tmp_path / "derivatives" / "dhcp_anat_pipeline"
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A", "birth_age": "33.5"}])
    _tsv(_sessions_tsv(tmp_path, "A"), [{"session_id": "1", "scan_age": "35.25"}])
    _tsv(_sessions_tsv(tmp_path, "B"), [{"session_id": "1", "scan_age": "40.0"}])
    # B's table next to its images wins over the one at the release root
    _tsv(_sessions_tsv(anat_root, "B"), [{"session_id": "1", "scan_age": "41.5"}])
    paths = {pid: _session(anat_root, pid, "1", rng) for pid in "AB"}
    for root in (tmp_path, anat_root):
        manifest = read_manifest(root, progress=False)
        assert manifest.complete.all(), manifest.reason.tolist()
        assert manifest.scan_age.tolist() == [35.25, 41.5]
        assert manifest.birth_age.iloc[0] == 33.5 and manifest.preterm.iloc[0]
        assert manifest.t2w.tolist() == [str(paths[pid]["t2w"]) for pid in "AB"]


def test_sessions_tsv_searched_in_both_places(tmp_path):
    anat_root = tmp_path / "derivatives" / "dhcp_anat_pipeline"
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A"}])
    _session(anat_root, "A", "1", np.random.default_rng(8))
    row = read_manifest(tmp_path, progress=False).iloc[0]
    assert row.reason == (
        f"missing scan age: neither {_sessions_tsv(anat_root, 'A')} nor "
        f"{_sessions_tsv(tmp_path, 'A')} found"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"images": "raw"}, "images must be one of"), ({"brain_mask": True}, "brain_mask must be")],
)
def test_bad_image_kind_or_mask_policy_raises(release, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        read_manifest(release[0], progress=False, **kwargs)


def test_metadata_and_preterm(manifest):
    cc001, cc002, cc003, cc004 = (
        _row(manifest, k) for k in ("CC001/1001", "CC002/900", "CC003/3001", "CC004/4001")
    )
    assert (cc001.scan_age, cc001.birth_age, cc001.sex, cc001.preterm) == (
        41.0,
        40.0,
        "male",
        False,
    )
    assert (cc002.scan_age, cc002.birth_age, cc002.sex) == (32.0, 30.5, "female")
    assert cc002.preterm  # prefixed ids in both TSVs matched the bare folder ids
    assert _row(manifest, "CC002/1000").scan_age == 40.5
    assert cc003.preterm  # 36.9 weeks
    assert not cc004.preterm  # exactly 37 weeks is term
    assert np.isnan(_row(manifest, "CC010/10001").scan_age)


def test_participant_missing_from_participants_tsv_stays_complete(manifest):
    row = _row(manifest, "CC011/11001")
    assert row.complete
    assert np.isnan(row.birth_age)
    assert pd.isna(row.sex)
    assert pd.isna(row.preterm)


def test_combined_tsv_fills_gaps(tmp_path):
    rng = np.random.default_rng(1)
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A", "sex": "female", "birth_age": ""}])
    _tsv(
        tmp_path / "combined.tsv",
        [
            {
                "participant_id": "sub-A",
                "session_id": "ses-1",
                "scan_age": "38.25",
                "birth_age": "35.0",
                "sex": "male",
            }
        ],
    )
    _tsv(_sessions_tsv(tmp_path, "A"), [{"session_id": "1"}])  # no scan_age column
    _session(tmp_path, "A", "1", rng)
    row = read_manifest(tmp_path, progress=False).iloc[0]
    assert row.complete, row.reason
    # sessions.tsv and participants.tsv win where they have a value
    assert (row.scan_age, row.birth_age, row.sex, row.preterm) == (38.25, 35.0, "female", True)


def test_invalid_birth_age_is_a_reason(tmp_path):
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A", "birth_age": "soon"}])
    _tsv(_sessions_tsv(tmp_path, "A"), [{"session_id": "1", "scan_age": "40"}])
    _session(tmp_path, "A", "1", np.random.default_rng(2))
    row = read_manifest(tmp_path, progress=False).iloc[0]
    expected = f"invalid birth age: 'soon' in {tmp_path / 'participants.tsv'} is not a number"
    assert row.reason == expected + " of weeks"
    assert not row.complete


def test_sessions_tsv_without_session_id_is_a_reason(tmp_path):
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A", "birth_age": "40"}])
    _tsv(_sessions_tsv(tmp_path, "A"), [{"scan_age": "40"}])
    _session(tmp_path, "A", "1", np.random.default_rng(5))
    row = read_manifest(tmp_path, progress=False).iloc[0]
    assert row.reason == (
        f"missing scan age: cannot use {_sessions_tsv(tmp_path, 'A')}: lacks the column(s) "
        "['session_id'] (found ['scan_age'])"
    )
    assert reason_categories(row.reason) == ["missing scan age"]


def _no_folder(tmp_path: Path) -> Path:
    return tmp_path / "nowhere"


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "release.tsv"
    path.write_text("participant_id\n")
    return path


def _no_participants_tsv(tmp_path: Path) -> Path:
    (tmp_path / "sub-A").mkdir()
    return tmp_path


def _no_subject_folders(tmp_path: Path) -> Path:
    _tsv(tmp_path / "participants.tsv", [{"participant_id": "A"}])
    return tmp_path


def _no_participant_id_column(tmp_path: Path) -> Path:
    _tsv(tmp_path / "participants.tsv", [{"subject": "A"}])
    (tmp_path / "sub-A").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("make_root", "message"),
    [
        (_no_folder, "nowhere: folder not found"),
        (_a_file, "release.tsv: is a file, not a folder"),
        (_no_participants_tsv, "participants.tsv: file not found"),
        (_no_subject_folders, r"holds no sub-\* folders"),
        (_no_participant_id_column, r"lacks the column\(s\) \['participant_id'\]"),
    ],
)
def test_bad_root_raises(tmp_path, make_root, message):
    with pytest.raises(DataError, match=message) as info:
        read_manifest(make_root(tmp_path), progress=False)
    if make_root is not _no_participant_id_column:
        assert "or its derivatives/dhcp_anat_pipeline folder" in str(info.value)  # the hint


def test_bad_workers_raises(release):
    with pytest.raises(ConfigError, match="workers"):
        read_manifest(release[0], workers=0)


# --------------------------------------------------------------------------------------
# Files and names
# --------------------------------------------------------------------------------------


def test_session_filename_and_find(tmp_path):
    assert session_filename("sub-A", "ses-1", "t2w") == "sub-A_ses-1_desc-restore_T2w.nii.gz"
    assert session_filename("A", "1", "t1w") == "sub-A_ses-1_desc-restore_T1w.nii.gz"
    assert session_filename("A", "1", "t1w", images="plain") == "sub-A_ses-1_T1w.nii.gz"
    assert session_filename("A", "1", "brain_mask") == "sub-A_ses-1_desc-brain_mask.nii.gz"
    paths = _session(tmp_path, "A", "1", np.random.default_rng(3), names=PLAIN, skip=("dseg",))
    anat = tmp_path / "sub-A" / "ses-1" / "anat"
    found = find_session_images(anat, "A", "1", images="plain")
    assert found == {
        "t1w": paths["t1w"],
        "t2w": paths["t2w"],
        "dseg": None,
        "brain_mask": paths["brain_mask"],
    }
    restored = find_session_images(anat, "A", "1")  # the plain pair is not the restored one
    assert (restored["t1w"], restored["t2w"]) == (None, None)
    assert find_session_images(tmp_path / "nowhere", "A", "1") == dict.fromkeys(found)


@pytest.fixture
def good_nifti(tmp_path) -> Path:
    return _save(tmp_path / "good.nii.gz", _intensity(np.random.default_rng(4)))


def test_load_nifti_reads_data_into_memory(good_nifti, tmp_path):
    image = load_nifti(good_nifti)
    assert image.shape == SHAPE
    assert isinstance(image.dataobj, np.ndarray)
    assert image.get_filename() == str(good_nifti)
    plain = tmp_path / "good.nii"
    plain.write_bytes(gzip.decompress(good_nifti.read_bytes()))
    np.testing.assert_array_equal(load_nifti(plain).get_fdata(), image.get_fdata())


def _flip_crc(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # the CRC32 in the gzip trailer
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("gone.nii.gz", lambda p: p.unlink(), "file not found"),
        ("scan.txt", None, "not a NIfTI file: the name must end in .nii or .nii.gz"),
        ("empty.nii.gz", lambda p: p.write_bytes(b""), r"empty file \(0 bytes\)"),
        ("noise.nii.gz", lambda p: p.write_bytes(NOT_GZIP), "corrupt gzip: not gzip data"),
        ("crc.nii.gz", _flip_crc, "corrupt gzip: CRC check failed"),
        (
            "cut.nii.gz",
            lambda p: p.write_bytes(p.read_bytes()[:-40]),
            "truncated: the gzip stream ends early",
        ),
        (
            "cut.nii",
            lambda p: p.write_bytes(gzip.decompress(p.read_bytes())[:600]),
            "truncated: the image data needs 1344 bytes after byte 352, the file holds 248",
        ),
        (
            "zipped.nii",
            None,
            r"not a NIfTI file: it is gzip-compressed \(rename it to .nii.gz\)",
        ),
        (
            "plain.nii.gz",
            lambda p: p.write_bytes(gzip.decompress(p.read_bytes())),
            r"corrupt gzip: not gzip data .* \(rename it to .nii\)",
        ),
        (
            "noise.nii",
            lambda p: p.write_bytes(NOT_GZIP),
            "not a NIfTI file: the header size field is neither 348",
        ),
        (
            "badmagic.nii",
            lambda p: p.write_bytes(
                gzip.decompress(p.read_bytes()).replace(b"n+1\x00", b"xyz\x00")
            ),
            r"not a NIfTI file: the header magic is b'xyz\\x00'",
        ),
    ],
)
def test_load_nifti_names_the_problem(good_nifti, name, damage, message):
    path = good_nifti.with_name(name)
    path.write_bytes(good_nifti.read_bytes())
    if damage is not None:
        damage(path)
    with pytest.raises(DataError, match=message) as info:
        load_nifti(path)
    assert info.value.path == str(path)


def test_load_nifti_refuses_a_folder(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a file"):
        load_nifti(tmp_path)


# --------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------


def _image(data: np.ndarray, affine: np.ndarray = AFFINE) -> nib.Nifti1Image:
    return nib.Nifti1Image(data, affine)


def test_check_image_3d():
    check_image_3d(_image(np.zeros(SHAPE, np.float32)))
    with pytest.raises(DataError, match=r"has shape \(6, 7, 8, 2\): 4 axes, expected a 3D image"):
        check_image_3d(_image(np.zeros((*SHAPE, 2), np.float32)))


def test_check_finite():
    check_finite(_image(np.zeros(SHAPE, np.int16)))
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, :2] = np.inf
    with pytest.raises(DataError, match="holds 0 NaN and 2 infinite voxels"):
        check_finite(_image(data))


def test_check_labels():
    check_labels(_image(np.arange(10, dtype=np.float32).reshape(2, 5, 1)))
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = 0.5
    with pytest.raises(
        DataError, match=r"holds values outside the labels 0-9 in 1 voxel \(e.g. 0.5\)"
    ):
        check_labels(_image(data))


def test_check_binary():
    check_binary(_image(np.array([[[0, 1]]], np.uint8)))
    check_binary(_image(np.array([[[0.0, 1.0]]], np.float32)))
    with pytest.raises(DataError, match=r"is not binary: .* in 1 voxel \(e.g. 0.5\)"):
        check_binary(_image(np.array([[[0.0, 0.5]]], np.float32)))


def test_check_same_shape_and_affine():
    reference = _image(np.zeros(SHAPE, np.float32))
    nearly = AFFINE.copy()
    nearly[1, 3] += 1e-4  # within the 0.001 mm tolerance
    check_same_affine(_image(np.zeros(SHAPE, np.float32), nearly), reference)
    check_same_shape(_image(np.zeros(SHAPE, np.float32), nearly), reference)
    with pytest.raises(DataError, match=r"shape \(6, 7, 9\) differs from \(6, 7, 8\)"):
        check_same_shape(_image(np.zeros((6, 7, 9), np.float32)), reference)
    with pytest.raises(DataError, match="by up to 0.5 mm"):
        check_same_affine(_image(np.zeros(SHAPE, np.float32), np.eye(4)), reference)


def test_check_session_skips_absent_images(release):
    _, images = release
    paths = images["CC003/3001"]
    assert check_session({"t1w": None, "t2w": paths["t2w"], "dseg": paths["dseg"]}) == []
    assert check_session({}) == []


# --------------------------------------------------------------------------------------
# Using a manifest
# --------------------------------------------------------------------------------------


def test_write_load_round_trip(checked, tmp_path):
    path = write_manifest(checked, tmp_path / "out" / "manifest.tsv")
    assert path.read_text().splitlines()[0].split("\t") == list(MANIFEST_COLUMNS)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    pd.testing.assert_frame_equal(load_manifest(path), checked)


def test_load_manifest_missing_columns(checked, tmp_path):
    path = tmp_path / "manifest.tsv"
    checked.drop(columns=["reason", "dseg"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(
        DataError, match=r"manifest.tsv: lacks the column\(s\) \['dseg', 'reason'\]"
    ):
        load_manifest(path)


def test_load_manifest_bad_value(checked, tmp_path):
    path = tmp_path / "manifest.tsv"
    checked.assign(complete="maybe").to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match=r"column complete holds 'maybe' \(row 2\)"):
        load_manifest(path)


def test_load_manifest_missing_file(tmp_path):
    with pytest.raises(DataError, match="manifest.tsv: file not found"):
        load_manifest(tmp_path / "manifest.tsv")


def test_summary(checked):
    summary = summarize_manifest(checked)
    assert (summary.n_sessions, summary.n_participants) == (17, 13)
    assert (summary.n_complete, summary.n_complete_participants) == (4, 3)
    assert summary.n_preterm == 2  # both sessions of CC002
    assert summary.n_birth_age_unknown == 1  # CC011
    assert summary.n_brain_mask == 3  # all but CC011
    assert summary.excluded["missing scan age"] == 3
    assert summary.excluded["missing T1w"] == 2
    text = str(summary)
    assert text.startswith("found 17 sessions of 13 participants\ncomplete: 4 sessions")
    assert "  missing scan age: 3" in text.splitlines()
    assert "brain mask: 3 of 4 complete sessions have one" in text.splitlines()
    assert "excluded: 13 sessions" in text


def test_manifest_without_brain_mask_column_still_loads(checked, tmp_path):
    path = tmp_path / "manifest.tsv"
    checked.drop(columns=["brain_mask"]).to_csv(path, sep="\t", index=False)
    loaded = load_manifest(path)
    assert list(loaded.columns) == list(MANIFEST_COLUMNS)
    assert (loaded.brain_mask == "").all()
    assert summarize_manifest(checked.drop(columns=["brain_mask"])).n_brain_mask == 0
    assert len(to_data_dicts(checked.drop(columns=["brain_mask"]))) == 4


def test_reason_categories():
    reason = "missing T1w; T2w unreadable: /a.nii.gz: truncated: x"
    assert reason_categories(reason) == ["missing T1w", "T2w unreadable"]
    assert reason_categories("") == []


def test_data_dicts(manifest, release):
    _, images = release
    records = to_data_dicts(manifest)
    assert len(records) == int(manifest.complete.sum())
    first = records[0]
    assert first == {
        "t1w": str(images["CC001/1001"]["t1w"]),
        "t2w": str(images["CC001/1001"]["t2w"]),
        "label": str(images["CC001/1001"]["dseg"]),
        "scan_age": 41.0,
        "participant_id": "CC001",
        "session_id": "1001",
    }
    assert all(type(r["scan_age"]) is float for r in records)
    with pytest.raises(DataError, match=r"sub-CC003/ses-3001: is not a complete session"):
        session_record(_row(manifest, "CC003/3001"))


def test_data_dicts_carry_the_brain_mask_only_when_applied(release, manifest):
    _, images = release
    assert all("brain_mask" not in r for r in to_data_dicts(manifest))
    masked = read_manifest(release[0], brain_mask="apply", progress=False)
    records = to_data_dicts(masked, brain_mask="apply")
    assert len(records) == int(masked.complete.sum()) == int(manifest.complete.sum()) - 1
    assert records[0]["brain_mask"] == str(images["CC001/1001"]["brain_mask"])
    # a manifest read with "ignore" keeps CC011, which has no mask to apply
    with pytest.raises(DataError, match=r"sub-CC011/ses-11001: has no brain mask to apply"):
        to_data_dicts(manifest, brain_mask="apply")
    with pytest.raises(ConfigError, match="brain_mask must be"):
        to_data_dicts(manifest, brain_mask="yes")
