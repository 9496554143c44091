"""Tests of neonb.synthesis on tiny crafted label maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from neonb.errors import ConfigError
from neonb.synthesis import SynthesisConfig, SynthesizeImaged, synthesize_image

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 24, 24)
AFFINE = np.diag([0.5, 0.5, 0.5, 1.0])
CLEAN = SynthesisConfig(
    real_prob=0.0,
    std_range=(0.0, 0.0),
    blur_std=(0.0, 0.0),
    bias_coefficient=0.0,
    anisotropy_prob=0.0,
    gamma_log=(0.0, 0.0),
    noise_std=(0.0, 0.0),
)
"""Tissue means only: every label gets one constant intensity."""
SYNTHETIC = SynthesisConfig(real_prob=0.0)
"""The default synthesis, never keeping the real image."""


def _sample():
    """A head (a ball of radius 9 voxels) of nested tissues, on a zero background."""
    i, j, k = np.indices(SHAPE)
    r = np.sqrt((i - 11.5) ** 2 + (j - 11.5) ** 2 + (k - 11.5) ** 2)
    label = np.select([r < 4, r < 6, r < 8, r < 9], [7, 3, 2, 4], 0).astype(np.float32)
    label[label == 3] = np.where(i[label == 3] < 12, 3, 5)
    head = r < 9.5  # one voxel of label 0 inside the head: synthesised, not masked
    rng = np.random.default_rng(0)
    image = np.stack([np.where(head, rng.uniform(1, 2, SHAPE), 0.0)] * 2).astype(np.float32)
    image[1] *= 3.0
    affine = torch.as_tensor(AFFINE)
    return {
        "image": MetaTensor(torch.as_tensor(image), affine=affine),
        "label": MetaTensor(torch.as_tensor(label[None]), affine=affine),
    }


def _synth(config=SYNTHETIC, seed=0, sample=None):
    transform = SynthesizeImaged(config).set_random_state(seed=seed)
    return transform(sample or _sample())


def test_same_seed_same_image_other_seed_other_image():
    first = _synth(seed=3)["image"]
    again = _synth(seed=3)["image"]
    other = _synth(seed=4)["image"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_channels_get_independent_contrasts():
    image = _synth(seed=1)["image"]
    assert not torch.allclose(image[0], image[1])


def test_outside_the_head_stays_zero_and_the_head_is_z_normalised():
    sample = _sample()
    head = (sample["image"] != 0).any(0)
    image = _synth(seed=2, sample=sample)["image"]
    assert torch.all(image[:, ~head] == 0)
    inside = image[:, head].double()
    np.testing.assert_allclose(inside.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(inside.std(1, unbiased=False), 1.0, atol=1e-4)


def test_image_follows_the_label_not_the_real_image():
    sample = _sample()
    head = (sample["image"] != 0).any(0)
    image = _synth(CLEAN, seed=5, sample=sample)["image"]
    label = sample["label"][0]
    for value in torch.unique(label[head]):
        inside = image[0][head & (label == value)]
        assert torch.allclose(inside, inside[0], atol=1e-5), f"label {value} not constant"
    assert len(torch.unique(image[0][head])) == len(torch.unique(label[head]))


def test_real_prob_one_keeps_the_real_image():
    sample = _sample()
    out = _synth(SynthesisConfig(real_prob=1.0), seed=0, sample=sample)
    assert out["image"] is sample["image"]
    assert out["label"] is sample["label"]


def test_real_prob_mixes_real_and_synthetic_patches():
    sample = _sample()
    transform = SynthesizeImaged(SynthesisConfig(real_prob=0.5, anisotropy_prob=0.0))
    kept = []
    for seed in range(16):
        transform.set_random_state(seed=seed)
        kept.append(transform(sample)["image"] is sample["image"])
    assert 0 < sum(kept) < len(kept)


def test_keeps_metadata_and_label_and_leaves_torch_rng_alone():
    sample = _sample()
    state = torch.get_rng_state()
    out = _synth(seed=0, sample=sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(out["image"], MetaTensor)
    np.testing.assert_array_equal(out["image"].affine, sample["image"].affine)
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["label"], sample["label"])


def test_empty_patch_stays_empty():
    sample = _sample()
    sample["image"] = sample["image"] * 0
    assert torch.all(_synth(seed=0, sample=sample)["image"] == 0)


def test_every_artefact_on_keeps_the_contract():
    config = SynthesisConfig(real_prob=0.0, anisotropy_prob=1.0, motion_prob=1.0, ghosting_prob=1.0)
    sample = _sample()
    head = (sample["image"] != 0).any(0)
    image = _synth(config, seed=7, sample=sample)["image"]
    assert image.shape == sample["image"].shape
    assert torch.isfinite(image).all()
    assert torch.all(image[:, ~head] == 0)
    assert _synth(config, seed=7)["image"].equal(image)


def test_synthesize_image_shape():
    label = torch.zeros(1, 8, 9, 10)
    label[:, 2:6] = 3
    image = synthesize_image(label, np.eye(4), SynthesisConfig(), channels=3)
    assert image.shape == (3, 8, 9, 10)
    assert image.dtype == torch.float32


def test_config_round_trip():
    config = SynthesisConfig(real_prob=0.3, motion_prob=0.1, mean_range=[0.2, 0.7])
    assert config.mean_range == (0.2, 0.7)
    assert SynthesisConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["mean_range"] == [0.2, 0.7]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"real_prob": 1.5}, "real_prob must be a probability"),
        ({"motion_prob": -0.1}, "motion_prob must be a probability"),
        ({"mean_range": (0.9, 0.1)}, "mean_range must satisfy"),
        ({"std_range": (-0.1, 0.1)}, "std_range must satisfy"),
        ({"anisotropy_factor": (0.5, 2.0)}, "anisotropy_factor must satisfy 1 <="),
        ({"noise_std": 0.1}, "noise_std must be a pair"),
        ({"bias_coefficient": -1.0}, "bias_coefficient must be at least 0"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SynthesisConfig(**overrides)


def test_negative_log_gamma_is_allowed_and_unknown_setting_raises():
    assert SynthesisConfig(gamma_log=(-0.5, -0.1)).gamma_log == (-0.5, -0.1)
    with pytest.raises(ConfigError, match=r"unknown synthesis setting\(s\) \['blur'\]"):
        SynthesisConfig.from_dict({"blur": 1.0})


def test_segmentation_path_does_not_import_torchio():
    """``neonb segment`` (and the config) must not load TorchIO."""
    script = (
        "import sys; import neonb.cli, neonb.segmentation, neonb.transforms, neonb.synthesis; "
        "neonb.synthesis.SynthesisConfig(); print('torchio' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_transform_pickles_for_data_loading_workers():
    import pickle

    transform = SynthesizeImaged(SYNTHETIC).set_random_state(seed=9)
    copy = pickle.loads(pickle.dumps(transform))
    assert torch.equal(transform(_sample())["image"], copy(_sample())["image"])
