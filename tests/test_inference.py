"""Tests of neonb.inference: sliding-window shapes and averaging, NIfTI output, weights."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet
from torch import nn

from neonb import inference
from neonb.errors import ConfigError, DataError
from neonb.inference import (
    default_segmentation_logits,
    describe_hardware,
    foreground_box,
    load_weights,
    predict_volume,
    save_segmentation,
    segment,
)

PATCH = (16, 16, 16)


def _dynunet(seed: int = 0) -> DynUNet:
    torch.manual_seed(seed)
    return DynUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=10,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 16],
        deep_supervision=True,
        deep_supr_num=1,
        res_block=True,
    )


class _Constant(nn.Module):
    """Returns the same logits at every voxel, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:])


@pytest.mark.parametrize("shape", [(37, 41, 29), (10, 12, 9)])
def test_output_has_the_input_shape(shape):
    image = torch.randn(2, *shape)
    probs = predict_volume(_dynunet(), image, patch_size=PATCH, overlap=0.25, sw_batch_size=4)
    assert probs.shape == (10, *shape)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(shape))


def test_constant_model_gives_its_probabilities_everywhere():
    logits = torch.linspace(-1.0, 2.0, 10)
    image = torch.randn(2, 21, 18, 19)  # smaller than two windows: overlaps and padding
    probs = predict_volume(_Constant(logits), image, patch_size=PATCH, overlap=0.5)
    expected = torch.softmax(logits, 0).view(-1, 1, 1, 1).expand_as(probs)
    torch.testing.assert_close(probs, expected)


def test_overlapping_windows_are_averaged_into_the_full_volume_result():
    torch.manual_seed(0)
    pointwise = nn.Conv3d(2, 10, kernel_size=1)  # the same answer at a voxel in every window
    image = torch.randn(2, 37, 41, 29)
    probs = predict_volume(
        pointwise, image, patch_size=PATCH, overlap=0.5, sw_batch_size=8, amp=False
    )
    with torch.no_grad():
        expected = torch.softmax(pointwise(image[None]), 1)[0]
    torch.testing.assert_close(probs, expected)


def test_segment_is_uint8_argmax_and_restores_train_mode():
    model = _dynunet()
    model.train()
    image = torch.randn(2, 20, 17, 16)
    labels = segment(model, image.numpy(), patch_size=PATCH, overlap=0.25)
    assert labels.dtype == np.uint8
    assert labels.shape == (20, 17, 16)
    assert model.training
    probs = predict_volume(model, image, patch_size=PATCH, overlap=0.25)
    np.testing.assert_array_equal(labels, probs.argmax(0).numpy())


def test_segment_predicts_inside_the_foreground_box_only():
    image = torch.zeros(2, 30, 26, 22)
    image[1, 5:20, 3:9, 10:21] = 1.0
    assert foreground_box(image) == (slice(5, 20), slice(3, 9), slice(10, 21))
    model = _Constant(torch.tensor([0.0, 0.0, 0.0, 5.0, 0, 0, 0, 0, 0, 0]))
    labels = segment(model, image, patch_size=PATCH, overlap=0.25)
    assert (labels[5:20, 3:9, 10:21] == 3).all()
    assert labels.sum() == 3 * 15 * 6 * 11  # 0 everywhere outside the box
    whole = segment(model, image, patch_size=PATCH, overlap=0.25, crop_foreground=False)
    assert (whole == 3).all()


def test_default_segmentation_logits_picks_head_zero():
    stacked = torch.randn(2, 3, 10, 4, 4, 4)
    assert torch.equal(default_segmentation_logits(stacked), stacked[:, 0])
    plain = torch.randn(2, 10, 4, 4, 4)
    assert default_segmentation_logits(plain) is plain
    with pytest.raises(ConfigError, match="segmentation_logits"):
        default_segmentation_logits((plain, torch.zeros(2)))


def test_a_custom_hook_reads_multi_task_outputs():
    class _TwoHeads(nn.Module):
        def forward(self, x):
            return {"segmentation": torch.zeros(x.shape[0], 10, *x.shape[2:]), "age": x.mean()}

    probs = predict_volume(
        _TwoHeads(),
        torch.randn(2, 8, 8, 8),
        patch_size=(8, 8, 8),
        segmentation_logits=lambda out: out["segmentation"],
    )
    torch.testing.assert_close(probs, torch.full((10, 8, 8, 8), 0.1))


@pytest.mark.parametrize(
    ("image", "kwargs"),
    [
        (torch.zeros(1, 2, 8, 8, 8), {}),  # batch axis given
        (torch.zeros(2, 8, 8, 8), {"overlap": 1.0}),
        (torch.zeros(2, 8, 8, 8), {"patch_size": (8, 8)}),
    ],
)
def test_bad_arguments_raise(image, kwargs):
    kwargs = {"patch_size": (8, 8, 8)} | kwargs
    with pytest.raises(ConfigError):
        predict_volume(_dynunet(), image, **kwargs)


def _reference(path, shape=(6, 7, 5)):
    """A float T2w-like image with an anisotropic, oblique affine and intensity scaling."""
    affine = np.array(
        [[0.5, 0.1, 0.0, -30.0], [0.0, 0.6, 0.0, 12.0], [0.0, 0.0, 1.2, 4.5], [0, 0, 0, 1]]
    )
    image = nib.Nifti1Image(np.random.default_rng(0).random(shape, np.float32), affine)
    image.header.set_slope_inter(2.0, 1.0)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return nib.load(path)


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii"])
def test_save_segmentation_round_trip(tmp_path, name):
    reference = _reference(tmp_path / "t2w.nii.gz")
    labels = np.random.default_rng(1).integers(0, 10, reference.shape).astype(np.uint8)
    out = save_segmentation(labels, tmp_path / "t2w.nii.gz", tmp_path / "out" / name)
    saved = nib.load(out)
    assert saved.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), labels)
    np.testing.assert_allclose(saved.affine, reference.affine)
    assert saved.header.get_zooms() == reference.header.get_zooms()
    assert saved.header.get_sform(coded=True)[1] == reference.header.get_sform(coded=True)[1]
    assert saved.header.get_qform(coded=True)[1] == reference.header.get_qform(coded=True)[1]
    assert saved.header.get_slope_inter() == (None, None)
    assert saved.header.get_xyzt_units() == ("mm", "sec")
    assert sorted(p.name for p in out.parent.iterdir()) == [name]  # no temporary file left


def test_save_segmentation_checks_shape_and_suffix(tmp_path):
    _reference(tmp_path / "t2w.nii.gz")
    with pytest.raises(DataError, match="shape"):
        save_segmentation(np.zeros((6, 7, 4)), tmp_path / "t2w.nii.gz", tmp_path / "s.nii.gz")
    with pytest.raises(ConfigError, match=".nii"):
        save_segmentation(np.zeros((6, 7, 5)), tmp_path / "t2w.nii.gz", tmp_path / "s.mgz")
    with pytest.raises(DataError, match="does not exist"):
        save_segmentation(np.zeros((6, 7, 5)), tmp_path / "none.nii.gz", tmp_path / "s.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2w.nii.gz"]


def test_load_weights_from_state_dict_or_checkpoint(tmp_path):
    source = _dynunet(seed=1)
    torch.save(source.state_dict(), tmp_path / "model_best.pt")
    torch.save({"epoch": 3, "model": source.state_dict()}, tmp_path / "checkpoint.pt")
    for name in ("model_best.pt", "checkpoint.pt"):
        model = load_weights(_dynunet(seed=2), tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value)


def test_load_weights_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_weights(_dynunet(), tmp_path / "missing.pt")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(DataError, match="does not fit"):
        load_weights(_dynunet(), tmp_path / "other.pt")
    torch.save({"weights": nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a pickled module
    with pytest.raises(DataError, match="cannot be read"):
        load_weights(_dynunet(), tmp_path / "pickled.pt")


def test_describe_hardware_names_the_cpu_and_its_threads():
    text = describe_hardware("cpu")
    assert text.startswith("CPU (") and f"{torch.get_num_threads()} threads" in text


def _head_image(shape=(30, 34, 26), seed=0):
    """Two channels, non-zero inside an off-centre block (a 'head'), zero around it."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.zeros(2, *shape)
    image[:, 3:27, 5:31, 2:22] = torch.randn(2, 24, 26, 20, generator=generator)
    return image


def test_fast_path_gives_the_reference_labels():
    """segment() in fp32 (head box, inference mode) against the naive path: MONAI's
    sliding windows over the head box under no_grad."""
    model = _dynunet(seed=3).eval()
    image = _head_image()
    box = foreground_box(image)
    with torch.no_grad():
        reference = sliding_window_inference(
            image[(slice(None), *box)][None], roi_size=PATCH, sw_batch_size=1,
            predictor=lambda x: torch.softmax(model(x), 1), overlap=0.5, mode="constant",
        )[0]  # fmt: skip
    cropped = image[(slice(None), *box)]
    fast = predict_volume(model, cropped, patch_size=PATCH, device="cpu", amp=False)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)
    labels = segment(model, image, patch_size=PATCH, device="cpu", amp=False)
    expected = np.zeros(image.shape[1:], np.uint8)
    expected[box] = reference.argmax(0).numpy()
    assert (labels == expected).mean() > 0.999  # float rounding may flip a tie
    assert labels[box].any() and not labels[:3].any()  # labels inside the box only


@pytest.mark.parametrize("start_channels_last", [False, True])
def test_channels_last_changes_no_result_and_is_undone(start_channels_last):
    model = _dynunet(seed=4)
    if start_channels_last:
        model.to(memory_format=torch.channels_last_3d)
    model.train()
    image = _head_image(seed=1)
    kwargs = {"patch_size": PATCH, "overlap": 0.25, "device": "cpu", "sw_batch_size": 2}
    kwargs["amp"] = False
    last = predict_volume(model, image, channels_last=True, **kwargs)
    plain = predict_volume(model, image, channels_last=False, **kwargs)
    torch.testing.assert_close(last, plain, atol=1e-5, rtol=1e-4)
    assert model.training
    weight = next(p for p in model.parameters() if p.ndim == 5)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) == start_channels_last
    assert not last.is_inference()  # a plain tensor, which may be changed in place
    last += 1


@pytest.mark.parametrize("stored_channels_last", [False, True])
def test_auto_layout_is_the_one_the_model_is_stored_in(stored_channels_last):
    model = _dynunet(seed=4)
    if stored_channels_last:
        model.to(memory_format=torch.channels_last_3d)
    assert inference.inference_channels_last("auto", model) == stored_channels_last
    assert inference.inference_channels_last(True, model)
    assert not inference.inference_channels_last(False, model)


def test_class_indices_are_argmax_ties_included():
    scores = torch.randint(0, 3, (2, 10, 6, 7, 8)).float()  # many ties among 3 values
    torch.testing.assert_close(inference.class_indices(scores, dim=1), scores.argmax(dim=1))
    kept = inference.class_indices(scores[0], dim=0, keepdim=True)
    assert kept.shape == (1, 6, 7, 8)
    torch.testing.assert_close(kept[0], scores[0].argmax(dim=0))


def test_channels_last_must_be_auto_or_a_bool():
    with pytest.raises(ConfigError, match="channels_last"):
        predict_volume(_dynunet(), torch.zeros(2, 8, 8, 8), patch_size=PATCH, channels_last="yes")


def test_bf16_windows_keep_the_labels_of_a_confident_model():
    torch.manual_seed(5)
    model = nn.Conv3d(2, 10, kernel_size=3, padding=1)
    with torch.no_grad():
        model.weight *= 20  # well-separated logits, as a trained network gives
    image = _head_image(seed=2)
    kwargs = {"patch_size": PATCH, "overlap": 0.5, "device": "cpu"}
    fp32 = predict_volume(model, image, amp=False, **kwargs)
    bf16 = predict_volume(model, image, amp=True, **kwargs)
    assert not torch.equal(bf16, fp32)  # the windows did run in bf16
    assert bf16.dtype == torch.float32  # probabilities are averaged in float32
    agree = (bf16.argmax(0) == fp32.argmax(0)).float().mean()
    assert agree > 0.99


@pytest.mark.parametrize(
    ("amp", "device", "native", "expected"),
    [
        ("native", "cpu", True, True),
        ("native", "cpu", False, False),
        ("auto", "cpu", True, False),
        ("native", "cuda", False, True),
        (True, "cpu", False, True),
        (False, "cpu", True, False),
        ("auto", "cuda", False, True),
        (False, "cuda", True, False),
        ("auto", "meta", True, False),
    ],
)
def test_inference_amp_follows_the_cpu(monkeypatch, amp, device, native, expected):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    assert inference.use_inference_amp(amp, torch.device(device)) is expected
    with pytest.raises(ConfigError, match="amp"):
        inference.use_inference_amp("bf16", torch.device(device))


def test_default_windows_per_pass_fit_the_voxel_budget():
    assert inference.default_sw_batch_size((48, 48, 48)) == 8  # the demo's windows
    assert inference.default_sw_batch_size((128, 128, 128)) == 1  # the paper's
    assert inference.default_sw_batch_size(PATCH) == inference.SW_BATCH_VOXELS // 16**3


def test_no_native_bf16_where_onednn_is_held_to_avx2():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` leaves oneDNN without bf16 convolutions, whatever the CPU."""
    code = "from neonb.inference import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
