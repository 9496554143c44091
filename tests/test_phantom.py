"""Tests of neonb.phantom, the seeded synthetic neonatal cohort.

Subjects are drawn on coarse grids (3-4 mm) so the whole module runs in seconds; the
properties tested (labels, growth, contrast, layout, determinism) hold at every voxel size.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from neonb import phantom
from neonb.errors import ConfigError
from neonb.labels import DRAWEM9

VOXEL_MM = 3.0  # 36 x 48 x 48 voxels
COHORT_VOXEL_MM = 4.0  # 27 x 36 x 36 voxels
YOUNG, OLD = 28.0, 44.0  # weeks PMA
SEED = 1
FLUIDS = (phantom.CSF, phantom.VENTRICLES)
TISSUES = (
    phantom.CGM,
    phantom.WM,
    phantom.NON_BRAIN,
    phantom.CEREBELLUM,
    phantom.DGM,
    phantom.BRAINSTEM,
    phantom.HIPPOCAMPI,
)


@pytest.fixture(scope="module")
def young() -> phantom.PhantomSubject:
    return phantom.make_subject(YOUNG, voxel_size=VOXEL_MM, seed=SEED)


@pytest.fixture(scope="module")
def old() -> phantom.PhantomSubject:
    return phantom.make_subject(OLD, voxel_size=VOXEL_MM, seed=SEED)


@pytest.fixture(scope="module")
def ages() -> pd.DataFrame:
    return phantom.sample_ages(5000, np.random.default_rng(0))


def _volume_ml(subject: phantom.PhantomSubject, labels: tuple[int, ...]) -> float:
    return float(np.isin(subject.dseg, labels).sum()) * subject.voxel_size**3 / 1000.0


def _centroid_mm(subject: phantom.PhantomSubject, label: int) -> np.ndarray:
    """World position (mm, RAS) of the centre of mass of ``label``."""
    voxels = np.argwhere(subject.dseg == label).mean(axis=0)
    return subject.affine[:3, :3] @ voxels + subject.affine[:3, 3]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- grid ----------------------------------------------------------------------------------


def test_grid_shape_matches_dhcp():
    assert phantom.grid_shape(0.5) == (217, 290, 290)
    assert phantom.grid_shape(1.5) == (72, 97, 97)


def test_grid_affine_is_ras_with_origin_at_the_centre():
    affine = phantom.grid_affine(VOXEL_MM)
    shape = np.array(phantom.grid_shape(VOXEL_MM))
    np.testing.assert_allclose(np.diag(affine), [VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    np.testing.assert_allclose(affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3], 0.0)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")


# --- one subject ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["young", "old"])
def test_subject_arrays(request, name):
    subject = request.getfixturevalue(name)
    shape = phantom.grid_shape(VOXEL_MM)
    assert subject.t1w.shape == subject.t2w.shape == subject.dseg.shape == shape
    assert subject.t1w.dtype == subject.t2w.dtype == np.float32
    assert subject.dseg.dtype == np.uint8
    np.testing.assert_array_equal(subject.affine, phantom.grid_affine(VOXEL_MM))


@pytest.mark.parametrize("name", ["young", "old"])
def test_all_ten_labels_present(request, name):
    subject = request.getfixturevalue(name)
    assert set(np.unique(subject.dseg).tolist()) == set(DRAWEM9)


@pytest.mark.parametrize("name", ["young", "old"])
def test_intensity_is_zero_exactly_outside_the_head(request, name):
    subject = request.getfixturevalue(name)
    outside = subject.dseg == phantom.OUTSIDE
    for image in (subject.t1w, subject.t2w):
        assert np.all(image[outside] == 0)
        assert np.all(image[~outside] > 0)
        assert np.isfinite(image).all()


def test_brain_volume_about_triples_from_28_to_44_weeks(young, old):
    ratio = _volume_ml(old, phantom.BRAIN_LABELS) / _volume_ml(young, phantom.BRAIN_LABELS)
    assert 2.5 < ratio < 3.5


def test_term_brain_volume_is_realistic():
    term = phantom.make_subject(40.0, voxel_size=VOXEL_MM, seed=SEED)
    assert 300 < _volume_ml(term, phantom.BRAIN_LABELS) < 500  # mL: 400 +- 10 % on average


def test_cerebellum_grows_faster_and_ventricles_slower_than_the_brain(young, old):
    def fraction(subject, label):
        return _volume_ml(subject, (label,)) / _volume_ml(subject, phantom.BRAIN_LABELS)

    assert fraction(old, phantom.CEREBELLUM) > 1.5 * fraction(young, phantom.CEREBELLUM)
    assert fraction(young, phantom.VENTRICLES) > 1.5 * fraction(old, phantom.VENTRICLES)


def test_relative_sizes_of_structures(old):
    volumes = {label: _volume_ml(old, (label,)) for label in phantom.BRAIN_LABELS}
    largest = sorted(volumes, key=volumes.get)[-2:]
    assert set(largest) == {phantom.CGM, phantom.WM}
    assert min(volumes, key=volumes.get) == phantom.HIPPOCAMPI


def test_structures_are_where_they_belong():
    subject = phantom.make_subject(40.0, voxel_size=2.0, seed=SEED)
    deep = _centroid_mm(subject, phantom.DGM)
    cerebellum = _centroid_mm(subject, phantom.CEREBELLUM)
    brainstem = _centroid_mm(subject, phantom.BRAINSTEM)
    assert cerebellum[1] < deep[1] - 20 and cerebellum[2] < deep[2] - 15  # posterior-inferior
    assert abs(brainstem[0] - deep[0]) < 4 and brainstem[2] < deep[2] - 10  # midline, below
    # The brainstem reaches the bottom of the brain.
    z = np.argwhere(np.isin(subject.dseg, phantom.BRAIN_LABELS))[:, 2]
    assert np.argwhere(subject.dseg == phantom.BRAINSTEM)[:, 2].min() == z.min()
    # Bilateral structures have a left and a right part of similar size.
    middle = subject.dseg.shape[0] // 2
    for label in (phantom.VENTRICLES, phantom.CEREBELLUM, phantom.DGM, phantom.HIPPOCAMPI):
        right = (subject.dseg[middle + 1 :] == label).sum()
        left = (subject.dseg[:middle] == label).sum()
        assert 0.5 < right / left < 2.0, DRAWEM9[label].name
    # Cortex covers the white matter, and CSF the brain.
    inner = ndimage.binary_dilation(subject.dseg == phantom.WM)
    assert (subject.dseg[inner & (subject.dseg == phantom.CSF)]).size < 0.05 * inner.sum()


def test_t1w_white_grey_contrast_flips_with_myelination(young, old):
    def white_minus_grey(subject):
        # Interior white matter, away from partial volume with the cortex.
        white = ndimage.binary_erosion(subject.dseg == phantom.WM)
        return subject.t1w[white].mean() - subject.t1w[subject.dseg == phantom.CGM].mean()

    assert white_minus_grey(young) < 0
    assert white_minus_grey(old) > 0


@pytest.mark.parametrize("name", ["young", "old"])
def test_t2w_fluid_is_brightest(request, name):
    subject = request.getfixturevalue(name)
    means = {label: subject.t2w[subject.dseg == label].mean() for label in DRAWEM9 if label}
    assert max(means, key=means.get) in FLUIDS
    assert all(means[phantom.CSF] > means[label] for label in TISSUES)
    # Unmyelinated white matter is brighter than cortex on T2w.
    assert means[phantom.WM] > means[phantom.CGM]


def test_same_seed_gives_identical_arrays(young):
    again = phantom.make_subject(YOUNG, voxel_size=VOXEL_MM, seed=SEED)
    for key in ("t1w", "t2w", "dseg"):
        np.testing.assert_array_equal(getattr(again, key), getattr(young, key))


def test_different_seeds_give_different_subjects(young):
    other = phantom.make_subject(YOUNG, voxel_size=VOXEL_MM, seed=SEED + 1)
    assert not np.array_equal(other.dseg, young.dseg)
    assert not np.array_equal(other.t2w, young.t2w)


def test_anatomy_does_not_depend_on_voxel_size():
    coarse = phantom.make_subject(OLD, voxel_size=4.0, seed=SEED)
    fine = phantom.make_subject(OLD, voxel_size=2.0, seed=SEED)
    for labels in (phantom.BRAIN_LABELS, (phantom.CEREBELLUM,)):
        assert _volume_ml(coarse, labels) == pytest.approx(_volume_ml(fine, labels), rel=0.1)


def test_preterm_birth_enlarges_ventricles():
    term = phantom.make_subject(40.0, voxel_size=VOXEL_MM, seed=SEED, birth_age=39.0)
    preterm = phantom.make_subject(40.0, voxel_size=VOXEL_MM, seed=SEED, birth_age=28.0)
    ventricles = (phantom.VENTRICLES,)
    assert _volume_ml(preterm, ventricles) > _volume_ml(term, ventricles)


# --- ages ----------------------------------------------------------------------------------


def test_scan_ages_follow_the_dhcp_distribution(ages):
    scan = ages.scan_age
    low, high = phantom.SCAN_AGE_RANGE
    assert low <= scan.min() < low + 1.0 and high - 1.0 < scan.max() <= high
    assert scan.median() == pytest.approx(40.57, abs=0.5)
    assert scan.mean() == pytest.approx(39.56, abs=0.5)
    assert stats.skew(scan) < -0.5
    assert (ages.birth_age < phantom.PRETERM_BIRTH_AGE).mean() == pytest.approx(148 / 709, abs=0.04)
    assert (ages.sex == "female").mean() == pytest.approx(0.5, abs=0.04)
    assert set(ages.sex) == {"female", "male"}
    assert (ages.birth_age <= ages.scan_age).all()


def test_second_sessions_are_preterm_infants_at_term_age(ages):
    repeated = ages[ages.participant_id.duplicated(keep=False)]
    assert len(repeated) > 0
    for _, sessions in repeated.groupby("participant_id"):
        first, second = sessions.scan_age.tolist()
        assert sessions.session_id.tolist() == ["1", "2"]
        assert sessions.birth_age.nunique() == 1
        assert sessions.birth_age.iloc[0] < phantom.PRETERM_BIRTH_AGE
        assert first < second and 38.0 <= second <= 44.0


def test_first_sessions_do_not_depend_on_n():
    many = phantom.sample_ages(50, 7)
    pd.testing.assert_frame_equal(many.iloc[:20], phantom.sample_ages(20, 7))


# --- files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "synthetic"
    return phantom.write_cohort(root, n=5, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False)


def test_write_cohort_layout(cohort):
    participants = pd.read_csv(cohort / "participants.tsv", sep="\t", dtype={"participant_id": str})
    assert list(participants.columns) == ["participant_id", "birth_age", "sex"]
    assert set(participants.sex) <= {"female", "male"}
    table = phantom.cohort_table(5, seed=2)
    assert list(participants.participant_id) == list(table.participant_id.unique())
    for row in table.itertuples():
        sub = f"sub-{row.participant_id}"
        sessions = pd.read_csv(cohort / sub / f"{sub}_sessions.tsv", sep="\t", dtype=str)
        assert list(sessions.columns) == ["session_id", "scan_age"]
        assert row.session_id in set(sessions.session_id)
        birth = participants.set_index("participant_id").birth_age[row.participant_id]
        assert (sessions.scan_age.astype(float) >= birth).all()
        anat = cohort / sub / f"ses-{row.session_id}" / "anat"
        prefix = f"{sub}_ses-{row.session_id}"
        names = {
            f"{prefix}_T2w.nii.gz",
            f"{prefix}_desc-restore_T2w.nii.gz",
            f"{prefix}_T1w.nii.gz",
            f"{prefix}_desc-restore_T1w.nii.gz",
            f"{prefix}_desc-drawem9_dseg.nii.gz",
            f"{prefix}_desc-brain_mask.nii.gz",
        }
        assert {p.name for p in anat.iterdir()} == names


def _anat_images(cohort: Path) -> dict[str, nib.Nifti1Image]:
    """The images of the cohort's first session, keyed by the name after ``ses-<id>_``."""
    anat = next(cohort.glob("sub-*/ses-*/anat"))
    return {path.name.split("_", 2)[2]: nib.load(path) for path in anat.iterdir()}


def _array(image: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(image.dataobj)


def test_plain_images_are_the_restored_ones_times_a_smooth_field(cohort):
    images = _anat_images(cohort)
    head = _array(images["desc-drawem9_dseg.nii.gz"]) > 0
    fields = []
    for modality in ("T2w", "T1w"):
        plain = _array(images[f"{modality}.nii.gz"])
        restored = _array(images[f"desc-restore_{modality}.nii.gz"])
        assert np.all(plain[~head] == 0) and np.all(plain[head] > 0)
        field = plain[head] / restored[head]
        log_sd = float(np.log(field).std())
        assert 0.03 < log_sd < 0.4, modality  # they really differ, by a bias-like field
        fields.append(np.full(plain.shape, np.nan, np.float32))
        fields[-1][head] = field
        # smooth: neighbouring voxels differ far less than the field varies over the head
        step = np.nanmedian(np.abs(np.diff(fields[-1], axis=0)))
        assert step < 0.3 * np.nanstd(fields[-1])
    # each image has its own field
    assert not np.allclose(fields[0][head], fields[1][head], rtol=0.01)


def test_scanner_bias_field_is_seeded_smooth_and_positive():
    shape = phantom.grid_shape(COHORT_VOXEL_MM)
    first = phantom.scanner_bias_field(shape, COHORT_VOXEL_MM, np.random.default_rng(4))
    again = phantom.scanner_bias_field(shape, COHORT_VOXEL_MM, np.random.default_rng(4))
    other = phantom.scanner_bias_field(shape, COHORT_VOXEL_MM, np.random.default_rng(5))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.dtype == np.float32 and first.shape == shape and np.all(first > 0)
    assert abs(float(np.log(first).mean())) < 1e-4  # geometric mean 1


def test_brain_mask_follows_the_dhcp_recipe(young):
    mask = young.brain_mask
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
    tissue = ~np.isin(young.dseg, (0, phantom.CSF, phantom.NON_BRAIN))
    assert np.all(mask[tissue] == 1)  # every tissue voxel, ventricles included
    assert mask[young.dseg == 0].mean() < 1e-3  # at most where the brainstem leaves the head
    assert not ndimage.binary_fill_holes(mask).astype(bool)[mask == 0].any()  # no holes
    # a closed outline about one voxel wider than the tissue: it holds some CSF, little skull
    assert 0.0 < mask[young.dseg == phantom.CSF].mean() < 1.0
    assert mask[young.dseg == phantom.NON_BRAIN].mean() < 0.25
    cube = np.ones((3, 3, 3), bool)
    assert np.all(ndimage.binary_dilation(tissue, cube, iterations=2)[mask == 1])
    np.testing.assert_array_equal(phantom.brain_mask_from_labels(young.dseg), mask)


def test_written_images_share_one_ras_affine(cohort):
    images = _anat_images(cohort)
    dseg = images.pop("desc-drawem9_dseg.nii.gz")
    mask = images.pop("desc-brain_mask.nii.gz")
    assert dseg.get_data_dtype() == np.uint8 and mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(dseg.dataobj)).tolist()) <= set(DRAWEM9)
    np.testing.assert_array_equal(
        np.asarray(mask.dataobj), phantom.brain_mask_from_labels(np.asarray(dseg.dataobj))
    )
    np.testing.assert_array_equal(mask.affine, dseg.affine)
    for image in images.values():
        assert image.get_data_dtype() == np.float32
        np.testing.assert_array_equal(image.affine, dseg.affine)
        assert np.all(np.asarray(image.dataobj)[np.asarray(dseg.dataobj) == 0] == 0)
    for image in (*images.values(), dseg, mask):
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert image.shape == phantom.grid_shape(COHORT_VOXEL_MM)
        assert int(image.header["qform_code"]) > 0 and int(image.header["sform_code"]) > 0
        assert image.header.get_xyzt_units()[0] == "mm"


def test_dataset_description_records_the_parameters(cohort):
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["BIDSVersion"] and description["GeneratedBy"][0]["Name"] == "neonb"
    params = description["neonb_phantom"]
    assert (params["n"], params["seed"], params["voxel_size"]) == (5, 2, COHORT_VOXEL_MM)


def test_gzip_headers_carry_no_timestamp(cohort):
    for path in cohort.rglob("*.nii.gz"):
        header = path.read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0\0\0\0", path.name
        assert gzip.decompress(path.read_bytes())  # a complete stream


def test_write_cohort_is_byte_identical_across_folders(cohort, tmp_path):
    again = phantom.write_cohort(
        tmp_path / "again", n=5, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False
    )
    assert _files(again) == _files(cohort)


def test_write_cohort_twice_rewrites_nothing(cohort):
    before = {p: p.stat().st_mtime_ns for p in cohort.rglob("*")}
    assert (
        phantom.write_cohort(cohort, n=5, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False)
        == cohort
    )
    assert {p: p.stat().st_mtime_ns for p in cohort.rglob("*")} == before


def test_write_cohort_completes_an_interrupted_run(cohort, tmp_path):
    root = tmp_path / "partial"
    phantom.write_cohort(root, n=5, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False)
    lost = next(root.rglob("*_T1w.nii.gz"))
    lost.unlink()
    (root / "participants.tsv").unlink()
    phantom.write_cohort(root, n=5, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False)
    assert _files(root) == _files(cohort)


def test_session_images_do_not_depend_on_n(cohort, tmp_path):
    smaller = phantom.write_cohort(
        tmp_path / "small", n=3, seed=2, voxel_size=COHORT_VOXEL_MM, progress=False
    )
    for name, data in _files(smaller).items():
        if name.endswith(".nii.gz"):
            assert data == (cohort / name).read_bytes(), name


def test_write_cohort_writes_multi_session_participants(tmp_path):
    table = phantom.cohort_table(60, seed=0)
    second = table.index[table.session_id == "2"][0]
    assert second < 40  # keep the cohort below small
    root = phantom.write_cohort(
        tmp_path / "multi", n=int(second) + 1, seed=0, voxel_size=8.0, progress=False
    )
    participant = table.participant_id[second]
    sessions = pd.read_csv(
        root / f"sub-{participant}" / f"sub-{participant}_sessions.tsv", sep="\t", dtype=str
    )
    assert list(sessions.session_id) == ["1", "2"]
    assert all((root / f"sub-{participant}" / f"ses-{s}" / "anat").is_dir() for s in "12")


# --- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_write_cohort_rejects_bad_n(tmp_path, n):
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        phantom.write_cohort(tmp_path / "bad", n=n, voxel_size=COHORT_VOXEL_MM, progress=False)


@pytest.mark.parametrize("voxel_size", [0.0, -1.5, float("nan"), 50.0])
def test_write_cohort_rejects_bad_voxel_size(tmp_path, voxel_size):
    with pytest.raises(ConfigError, match="voxel_size"):
        phantom.write_cohort(tmp_path / "bad", n=2, voxel_size=voxel_size, progress=False)


def test_write_cohort_rejects_a_cohort_written_with_other_parameters(cohort):
    with pytest.raises(ConfigError, match="seed=2.*seed=3"):
        phantom.write_cohort(cohort, n=5, seed=3, voxel_size=COHORT_VOXEL_MM, progress=False)


def test_write_cohort_rejects_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a cohort")
    with pytest.raises(ConfigError, match="not empty"):
        phantom.write_cohort(tmp_path, n=2, voxel_size=COHORT_VOXEL_MM, progress=False)


def test_write_cohort_rejects_a_negative_seed(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        phantom.write_cohort(tmp_path / "bad", n=2, seed=-1, progress=False)


def test_sample_ages_rejects_n_below_one():
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        phantom.sample_ages(0, np.random.default_rng(0))


def test_make_subject_rejects_a_bad_voxel_size():
    with pytest.raises(ConfigError, match="voxel_size"):
        phantom.make_subject(40.0, voxel_size=0.0)


@pytest.mark.parametrize("scan_age", [10.0, 60.0, float("inf")])
def test_make_subject_rejects_an_unsupported_age(scan_age):
    with pytest.raises(ConfigError, match="scan_age"):
        phantom.make_subject(scan_age, voxel_size=VOXEL_MM)


def test_make_subject_rejects_birth_after_scan():
    with pytest.raises(ConfigError, match="birth_age must not be after scan_age"):
        phantom.make_subject(30.0, voxel_size=VOXEL_MM, birth_age=32.0)
