"""Tests of neonb.transforms on a tiny synthetic session written as NIfTI."""

from __future__ import annotations

import dataclasses
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, list_data_collate
from monai.transforms import Randomizable

from neonb.engine import SeededSamples
from neonb.errors import ConfigError, DataError
from neonb.models import ModelConfig
from neonb.synthesis import SynthesisConfig
from neonb.transforms import (
    ApplyBrainMaskd,
    AugmentationConfig,
    LoadVolumed,
    augmentation_transforms,
    augmented_example,
    eval_transforms,
    preprocessing_transforms,
    train_transforms,
    validation_transforms,
)

SHAPE = (20, 24, 22)
"""Grid of the synthetic session, in voxels."""
BOX = (slice(3, 17), slice(2, 21), slice(4, 19))
"""Where the synthetic head is non-zero: a (14, 19, 15) bounding box."""
BOX_SHAPE = (14, 19, 15)
AFFINE = np.diag([0.5, 0.5, 0.5, 1.0])
TINY = ModelConfig(filters=(4, 8, 16), strides=(1, 2, 2), deep_supr_num=1)
"""Total stride 4, so patches of 8, 12, 16, ... voxels are allowed."""
STRONG = dataclasses.replace(
    AugmentationConfig.always(), elastic_sigma=(3.0, 4.0), elastic_magnitude=(50.0, 100.0)
)
"""Every augmentation, with an elastic deformation that is strong on a tiny patch."""


def _volumes(seed=0):
    rng = np.random.default_rng(seed)
    t1w = np.zeros(SHAPE, np.float32)
    t2w = np.zeros(SHAPE, np.float32)
    label = np.zeros(SHAPE, np.float32)
    t1w[BOX] = rng.uniform(100, 300, BOX_SHAPE)
    t2w[BOX] = rng.uniform(500, 1500, BOX_SHAPE)
    t2w[3, 2, 4] = 0.0  # a zero voxel inside the head stays out of the normalisation
    # blocks of labels 1-9 that vary along every axis, so flips and deformations move them
    i, j, k = np.indices(BOX_SHAPE)
    label[BOX] = (i // 2 + j // 3 + k // 2) % 9 + 1
    return {"t1w": t1w, "t2w": t2w, "label": label}


def _write(path, array):
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return str(path)


@pytest.fixture
def sample(tmp_path):
    """A raw sample with NIfTI files, as the data module produces it."""
    paths = {key: _write(tmp_path / f"{key}.nii.gz", v) for key, v in _volumes().items()}
    return {**paths, "scan_age": 40.5, "participant_id": "CC001", "session_id": "1"}


@pytest.fixture
def array_sample():
    return {**_volumes(), "scan_age": 40.5, "participant_id": "CC001", "session_id": "1"}


def _with_annotation(sample, annotation):
    return {**sample, "annotation": annotation}


# (crop, image shape, label/annotation shape)
PREPROCESSING_SHAPES = [
    (True, (2, *BOX_SHAPE), (1, *BOX_SHAPE)),
    (False, (2, *SHAPE), (1, *SHAPE)),
]


@pytest.mark.parametrize(("crop", "image_shape", "label_shape"), PREPROCESSING_SHAPES)
def test_preprocessing_keys_shapes_dtypes(sample, crop, image_shape, label_shape):
    out = preprocessing_transforms(crop=crop)(sample)
    assert set(out) == {"image", "label", "annotation", "scan_age", "participant_id", "session_id"}
    assert out["image"].shape == image_shape
    assert out["label"].shape == out["annotation"].shape == label_shape
    for key in ("image", "label", "annotation"):
        assert isinstance(out[key], MetaTensor)
        assert out[key].dtype == torch.float32
    assert out["scan_age"] == 40.5 and out["participant_id"] == "CC001"
    assert torch.equal(out["label"], out["label"].round())
    assert set(out["label"].unique().tolist()) <= set(range(10))


def test_crop_removes_the_zero_border(sample):
    out = preprocessing_transforms(crop=True)(sample)
    raw = _volumes()
    assert np.array_equal(out["label"][0].numpy(), raw["label"][BOX])
    nonzero = out["image"].abs().sum(0) > 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = nonzero.any(dim=other[1]).any(dim=other[0])
        assert profile[0] and profile[-1]  # no all-zero plane left on either side


def test_no_crop_keeps_the_input_grid(sample):
    out = eval_transforms(crop=False)(sample)
    assert out["image"].shape[1:] == SHAPE
    assert np.allclose(np.asarray(out["image"].affine), AFFINE)
    assert np.array_equal(out["label"][0].numpy(), _volumes()["label"])


@pytest.mark.parametrize("crop", [True, False])
def test_channelwise_zscore_over_nonzero_voxels(sample, crop):
    image = preprocessing_transforms(crop=crop)(sample)["image"].as_tensor()
    raw = _volumes()
    for channel, key in enumerate(("t1w", "t2w")):
        nonzero = torch.as_tensor(raw[key] != 0)
        if crop:
            nonzero = nonzero[BOX]
        values = image[channel][nonzero]
        assert abs(values.mean().item()) < 1e-4
        assert abs(values.std().item() - 1.0) < 1e-3
        assert torch.count_nonzero(image[channel][~nonzero]) == 0


def test_channel_order_is_t1w_then_t2w(sample):
    out = preprocessing_transforms(crop=False)(sample)
    raw = _volumes()
    inside = (raw["t1w"] != 0) & (raw["t2w"] != 0)
    for channel, (key, other) in enumerate((("t1w", "t2w"), ("t2w", "t1w"))):
        values = out["image"][channel].numpy()[inside]
        assert np.corrcoef(values, raw[key][inside])[0, 1] > 0.9999
        assert abs(np.corrcoef(values, raw[other][inside])[0, 1]) < 0.2


def test_annotation_is_all_ones_when_absent(sample):
    out = preprocessing_transforms()(sample)
    assert torch.equal(out["annotation"], torch.ones_like(out["label"]))


def test_annotation_file_is_loaded_cropped_and_binarised(sample, tmp_path):
    mask = np.zeros(SHAPE, np.float32)
    mask[:, :, 6::4] = 2.0  # every fourth axial slice, stored as 2
    out = preprocessing_transforms()(_with_annotation(sample, _write(tmp_path / "m.nii.gz", mask)))
    assert np.array_equal(out["annotation"][0].numpy(), (mask[BOX] != 0).astype(np.float32))


def test_arrays_and_files_give_the_same_result(sample, array_sample):
    from_files = preprocessing_transforms()(sample)
    from_arrays = preprocessing_transforms()(array_sample)
    for key in ("image", "label", "annotation"):
        assert torch.allclose(from_files[key].as_tensor(), from_arrays[key].as_tensor())


def test_arrays_are_not_modified(array_sample):
    before = {k: v.copy() for k, v in _volumes().items()}
    train_transforms(12, AugmentationConfig.always(), model=TINY)(array_sample)
    for key, value in before.items():
        assert np.array_equal(array_sample[key], value)


def _raises_in_compose(sample, error, match):
    """A ``Compose`` re-raises as ``RuntimeError`` whose cause is the transform's own error."""
    with pytest.raises(RuntimeError, match="LoadVolumed") as info:
        preprocessing_transforms()(sample)
    assert isinstance(info.value.__cause__, error)
    assert re.search(match, str(info.value.__cause__))
    with pytest.raises(error, match=match):
        LoadVolumed(["t1w", "t2w", "label"], optional_keys=["annotation"])(sample)


def test_grid_mismatch_names_the_file(sample, tmp_path):
    bad = _write(tmp_path / "small_T2w.nii.gz", np.ones((20, 24, 20), np.float32))
    _raises_in_compose({**sample, "t2w": bad}, DataError, r"small_T2w.nii.gz.*\(20, 24, 20\)")


def test_missing_file_raises(sample, tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    _raises_in_compose(
        {**sample, "label": missing}, DataError, "nope.nii.gz: label image not found"
    )


def test_missing_key_raises(sample):
    del sample["t2w"]
    _raises_in_compose(sample, KeyError, "t2w")


def test_bad_array_shape_raises(array_sample):
    array_sample["label"] = np.zeros((2, *SHAPE))
    _raises_in_compose(array_sample, DataError, "expected")


def test_metatensor_input_keeps_its_affine(array_sample):
    affine = torch.diag(torch.tensor([0.8, 0.8, 0.8, 1.0], dtype=torch.float64))
    array_sample["t1w"] = MetaTensor(torch.as_tensor(array_sample["t1w"]), affine=affine)
    out = LoadVolumed(["t1w", "t2w", "label"])(array_sample)
    assert out["t1w"].shape == (1, *SHAPE)
    assert torch.allclose(out["t1w"].affine, affine)


# (patch size, image shape after augmentation); the cropped volume is (14, 19, 15)
PATCH_SHAPES = [
    (8, (2, 8, 8, 8)),
    ((12, 16, 8), (2, 12, 16, 8)),
    (16, (2, 16, 16, 16)),  # padded along X and Z
    ((24, 24, 20), (2, 24, 24, 20)),  # padded everywhere
]


@pytest.mark.parametrize(("patch", "image_shape"), PATCH_SHAPES)
@pytest.mark.parametrize("config", [AugmentationConfig(), AugmentationConfig.always()])
def test_train_output_shapes(sample, patch, image_shape, config):
    out = train_transforms(patch, config, model=TINY).set_random_state(seed=1)(sample)
    assert out["image"].shape == image_shape
    assert out["label"].shape == out["annotation"].shape == (1, *image_shape[1:])
    assert out["image"].dtype == out["label"].dtype == torch.float32


@pytest.mark.parametrize(("patch", "image_shape"), PATCH_SHAPES)
def test_validation_output_shapes_and_centre(sample, patch, image_shape):
    pre = preprocessing_transforms()(sample)
    out = validation_transforms(patch, model=TINY)(pre)
    assert out["image"].shape == image_shape
    again = eval_transforms(patch, model=TINY)(sample)
    assert torch.equal(out["image"].as_tensor(), again["image"].as_tensor())
    # centre crop of the zero-padded volume
    target = image_shape[1:]
    padded = pre["label"].as_tensor()
    for axis, size in enumerate(target):
        dim = axis + 1
        if padded.shape[dim] < size:
            before = (size - padded.shape[dim]) // 2
            pad = [0, 0] * 3
            pad[2 * (2 - axis)] = before
            pad[2 * (2 - axis) + 1] = size - padded.shape[dim] - before
            padded = torch.nn.functional.pad(padded, pad)
    starts = [(padded.shape[a + 1] - s) // 2 for a, s in enumerate(target)]
    window = padded[
        :,
        starts[0] : starts[0] + target[0],
        starts[1] : starts[1] + target[1],
        starts[2] : starts[2] + target[2],
    ]
    assert torch.equal(out["label"].as_tensor(), window)


@pytest.mark.parametrize(
    "annotate",
    [
        pytest.param(lambda label: label > 4, id="label>4"),
        pytest.param(lambda label: (label % 3 == 1) & (label > 0), id="label%3==1"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_annotation_stays_aligned_with_label(array_sample, annotate, seed):
    array_sample["annotation"] = annotate(array_sample["label"]).astype(np.float32)
    tf = train_transforms((16, 16, 12), STRONG, model=TINY)
    out = tf.set_random_state(seed=seed)(array_sample)
    label, annotation = out["label"].as_tensor(), out["annotation"].as_tensor()
    assert torch.equal(annotation, annotate(label).float())
    assert 0 < annotation.sum() < annotation.numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elastic_deformation_moves_label_and_annotation(array_sample, seed):
    array_sample["annotation"] = (array_sample["label"] > 4).astype(np.float32)
    elastic_only = dataclasses.replace(
        STRONG, **{**dict.fromkeys(STRONG.probability_fields(), 0.0), "elastic_prob": 1.0}
    )
    before, after = augmented_example(array_sample, 16, elastic_only, seed=seed, model=TINY)
    assert (before["label"] != after["label"]).mean() > 0.1
    assert np.array_equal(after["annotation"], (after["label"] > 4).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1])
def test_slice_annotation_stays_aligned(array_sample, seed):
    """A slice pattern that is no function of the label: encode it in a copy of the label."""
    z = np.arange(SHAPE[2])
    slices = np.broadcast_to(z % 3 == 0, SHAPE).astype(np.float32)
    array_sample["annotation"] = slices
    # code each voxel's slice parity into a label that the transforms move like the real one
    array_sample["label"] = np.where(array_sample["t1w"] > 0, 1 + (z % 3 == 0), 0).astype(
        np.float32
    )
    tf = train_transforms(16, STRONG, model=TINY)
    out = tf.set_random_state(seed=seed)(array_sample)
    assert torch.equal(out["annotation"].as_tensor(), (out["label"].as_tensor() == 2).float())


def test_full_augmentation_changes_the_patch(sample):
    config = AugmentationConfig.always()
    before, after = augmented_example(sample, 16, config, seed=3, model=TINY)
    assert not np.allclose(before["image"], after["image"])
    assert not np.array_equal(before["label"], after["label"])


def test_seeded_composes_give_identical_outputs(sample):
    def run(seed):
        tf = train_transforms(12, AugmentationConfig.always(), model=TINY)
        return tf.set_random_state(seed=seed)(sample)

    a, b, c = run(7), run(7), run(8)
    for key in ("image", "label", "annotation"):
        assert torch.equal(a[key].as_tensor(), b[key].as_tensor())
    assert not torch.equal(a["image"].as_tensor(), c["image"].as_tensor())


def test_validation_is_deterministic(sample):
    tf = eval_transforms(12, model=TINY)
    a, b = tf(sample), tf(sample)
    assert not any(isinstance(t, Randomizable) for t in tf.transforms)
    for key in ("image", "label", "annotation"):
        assert torch.equal(a[key].as_tensor(), b[key].as_tensor())


def test_augmented_example_keeps_the_crop_location(sample):
    intensity_only = dataclasses.replace(AugmentationConfig.none(), noise_prob=1.0, scale_prob=1.0)
    before, after = augmented_example(sample, 12, intensity_only, seed=5, model=TINY)
    assert set(before) == set(after) == {"image", "label", "annotation"}
    assert isinstance(before["image"], np.ndarray) and before["image"].shape == (2, 12, 12, 12)
    assert np.array_equal(before["label"], after["label"])
    assert not np.allclose(before["image"], after["image"])
    again = augmented_example(sample, 12, intensity_only, seed=5, model=TINY)
    assert np.array_equal(again[1]["image"], after["image"])


def test_augmented_example_accepts_preprocessed_sample(sample):
    pre = preprocessing_transforms()(sample)
    a = augmented_example(pre, 12, AugmentationConfig.none(), seed=0, model=TINY)
    b = augmented_example(sample, 12, AugmentationConfig.none(), seed=0, model=TINY)
    assert np.array_equal(a[0]["image"], b[0]["image"])
    assert np.array_equal(a[0]["image"], a[1]["image"])


def test_train_transforms_are_cacheable(sample):
    tf = train_transforms(12, model=TINY)
    n_pre = len(preprocessing_transforms().transforms)
    first_random = tf.get_index_of_first(lambda t: isinstance(t, Randomizable))
    assert first_random == n_pre + 1  # loading ... EnsureTyped, SpatialPadd are cached
    ds = CacheDataset([sample, sample], tf, progress=False)
    assert ds[0]["image"].shape == (2, 12, 12, 12)


def test_mixed_samples_collate_into_a_batch(sample, array_sample):
    """Fully and partially annotated samples, after different random draws, batch together."""
    array_sample["annotation"] = (array_sample["label"] > 4).astype(np.float32)
    tf = train_transforms(12, model=TINY).set_random_state(seed=0)
    batch = list_data_collate([tf(sample), tf(array_sample)])
    assert batch["image"].shape == (2, 2, 12, 12, 12)
    assert batch["label"].shape == batch["annotation"].shape == (2, 1, 12, 12, 12)
    assert batch["participant_id"] == ["CC001", "CC001"]
    assert torch.equal(batch["scan_age"], torch.tensor([40.5, 40.5], dtype=torch.float64))


def test_none_leaves_only_the_patch_crop():
    tf = augmentation_transforms(12, AugmentationConfig.none(), model=TINY)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["SpatialPadd", "RandSpatialCropd"]


@pytest.mark.parametrize("patch", [10, (12, 12, 14), 4, (8, 8)])
def test_bad_patch_size_raises(patch):
    with pytest.raises(ConfigError, match="patch_size"):
        train_transforms(patch, model=TINY)
    with pytest.raises(ConfigError, match="patch_size"):
        validation_transforms(patch, model=TINY)


def test_default_model_needs_multiples_of_32():
    with pytest.raises(ConfigError, match="total stride"):
        augmentation_transforms(48)
    assert augmentation_transforms(64) is not None


def test_config_round_trip_and_presets():
    config = AugmentationConfig(elastic_prob=0.5, flip_axes=(0, 2))
    assert AugmentationConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["elastic_sigma"] == [9.0, 13.0]
    assert all(getattr(AugmentationConfig.none(), n) == 0 for n in config.probability_fields())
    assert all(getattr(AugmentationConfig.always(), n) == 1 for n in config.probability_fields())
    assert len(config.probability_fields()) == 6


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"noise_prob": -0.1}, "noise_prob"),
        ({"elastic_sigma": (13.0, 9.0)}, "elastic_sigma"),
        ({"elastic_sigma": (0.0, 9.0)}, "elastic_sigma must be positive"),
        ({"elastic_magnitude": 5.0}, "elastic_magnitude"),
        ({"smooth_sigma": (-1.0, 1.0)}, "smooth_sigma"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"flip_axes": (0, 3)}, "flip_axes"),
        ({"flip_axes": (1, 1)}, "flip_axes"),
    ],
)
def test_bad_augmentation_config_raises(overrides, match):
    with pytest.raises(ConfigError, match=match):
        AugmentationConfig(**overrides)


def test_unknown_augmentation_setting_raises():
    with pytest.raises(ConfigError, match="unknown augmentation setting"):
        AugmentationConfig.from_dict({"rotate_prob": 0.2})


# --------------------------------------------------------------------------------------
# Brain mask
# --------------------------------------------------------------------------------------

BRAIN = (slice(6, 14), slice(5, 18), slice(7, 16))
"""A brain mask strictly inside the head box, so masking removes head voxels."""


def _brain_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[BRAIN] = 1
    return mask


def test_apply_brain_mask_zeroes_outside_and_keeps_inside():
    image = MetaTensor(torch.rand(2, *SHAPE) + 1.0, affine=torch.as_tensor(AFFINE))
    mask = torch.as_tensor(_brain_mask()[None], dtype=torch.float32)
    out = ApplyBrainMaskd("image")({"image": image.clone(), "brain_mask": mask, "scan_age": 40.0})
    assert "brain_mask" not in out and out["scan_age"] == 40.0
    inside = mask[0].bool()
    for channel in range(2):
        assert torch.all(out["image"][channel][~inside] == 0)
        assert torch.equal(out["image"][channel][inside], image[channel][inside])
    assert isinstance(out["image"], MetaTensor)
    np.testing.assert_array_equal(out["image"].affine, AFFINE)
    # a sample without a mask passes unchanged
    plain = ApplyBrainMaskd("image")({"image": image})
    assert torch.equal(plain["image"], image)


@pytest.mark.parametrize("crop", [True, False])
def test_preprocessing_applies_the_brain_mask_of_the_sample(sample, tmp_path, crop):
    masked_sample = {**sample, "brain_mask": _write(tmp_path / "mask.nii.gz", _brain_mask())}
    out = preprocessing_transforms(crop=crop)(masked_sample)
    assert "brain_mask" not in out
    # the same as skull stripping the files first: zeros outside, then crop and normalise
    stripped = dict(sample)
    for key in ("t1w", "t2w"):
        volume = np.asarray(nib.load(sample[key]).dataobj) * _brain_mask()
        stripped[key] = _write(tmp_path / f"stripped_{key}.nii.gz", volume.astype(np.float32))
    expected = preprocessing_transforms(crop=crop)(stripped)
    torch.testing.assert_close(out["image"].as_tensor(), expected["image"].as_tensor())
    torch.testing.assert_close(out["label"].as_tensor(), expected["label"].as_tensor())
    if crop:  # the crop is the brain's bounding box
        assert tuple(out["image"].shape[1:]) == tuple(s.stop - s.start for s in BRAIN)
    else:
        outside = torch.as_tensor(_brain_mask() == 0)
        assert torch.all(out["image"][:, outside] == 0)
        assert torch.all(out["image"][:, ~outside] != 0)  # brain voxels are all non-zero here
    unmasked = preprocessing_transforms(crop=crop)(sample)
    assert out["image"].shape != unmasked["image"].shape or not torch.equal(
        out["image"], unmasked["image"]
    )


def test_brain_mask_on_another_grid_is_named(sample, tmp_path):
    mask = _write(tmp_path / "mask.nii.gz", np.ones((20, 24, 21), np.uint8))
    with pytest.raises(RuntimeError) as info:
        preprocessing_transforms()({**sample, "brain_mask": mask})
    assert isinstance(info.value.__cause__, DataError)
    assert "brain_mask has (20, 24, 21) voxels" in str(info.value.__cause__)


# --- domain randomisation (neonb.synthesis) ----------------------------------------------

SYNTH_CLEAN = SynthesisConfig(
    real_prob=0.0,
    std_range=(0.0, 0.0),
    blur_std=(0.0, 0.0),
    bias_coefficient=0.0,
    anisotropy_prob=0.0,
    gamma_log=(0.0, 0.0),
    noise_std=(0.0, 0.0),
)
"""Synthesis with tissue means only: each label of the patch gets one intensity."""


def test_synthesis_sits_after_the_spatial_and_before_the_intensity_augmentations():
    config = AugmentationConfig()
    plain = [type(t).__name__ for t in augmentation_transforms(16, config, model=TINY).transforms]
    tf = augmentation_transforms(16, config, model=TINY, synthesis=SynthesisConfig())
    names = [type(t).__name__ for t in tf.transforms]
    assert "SynthesizeImaged" not in plain
    at = names.index("SynthesizeImaged")
    assert names[:at] == plain[:at] and names[at + 1 :] == plain[at:]
    assert plain[at - 1] == "OneOf" and plain[at] == "RandGaussianNoised"


def test_synthesis_none_is_the_chain_of_the_paper(sample):
    pre = preprocessing_transforms()(sample)
    config = AugmentationConfig.always()
    a = augmentation_transforms(12, config, model=TINY).set_random_state(seed=4)(dict(pre))
    b = augmentation_transforms(12, config, model=TINY, synthesis=None)
    b = b.set_random_state(seed=4)(dict(pre))
    assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())


def test_synthesised_patch_follows_the_moved_label(sample):
    pre = preprocessing_transforms()(sample)
    spatial = dataclasses.replace(
        STRONG, noise_prob=0.0, smooth_prob=0.0, scale_prob=0.0, shift_prob=0.0
    )
    tf = augmentation_transforms(12, spatial, model=TINY, synthesis=SYNTH_CLEAN)
    out = tf.set_random_state(seed=2)(dict(pre))
    image, label = out["image"].as_tensor(), out["label"].as_tensor()[0]
    head = (image != 0).any(0)
    assert head.sum() > 100
    for value in torch.unique(label[head]):
        for channel in image:
            inside = channel[head & (label == value)]
            assert torch.allclose(inside, inside[0], atol=1e-5)


def test_synthesised_patches_are_seeded_per_sample(sample):
    dataset = SeededSamples(
        Dataset([sample], augmentation_transforms(12, model=TINY, synthesis=SYNTH_CLEAN))
    )
    dataset.dataset.data = [preprocessing_transforms()(sample)]
    first, again, other = dataset[(11, 0)], dataset[(11, 0)], dataset[(12, 0)]
    assert torch.equal(first["image"].as_tensor(), again["image"].as_tensor())
    assert not torch.equal(first["image"].as_tensor(), other["image"].as_tensor())
