"""Tests of neonb.losses: masked Dice + CE and the deep-supervision wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from neonb.errors import ConfigError
from neonb.losses import (
    MaskedDiceCELoss,
    SegmentationLoss,
    deep_supervision_weights,
    masked_dice_ce,
    masked_dice_ce_heads,
)

C = 10
ATOL = 1e-6


def _data(batch=2, shape=(6, 5, 4), classes=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *shape, generator=g)
    label = torch.randint(0, classes, (batch, 1, *shape), generator=g).float()
    return logits, label


def _slice_mask(label, step=3):
    """Annotate every ``step``-th slice along the last axis."""
    mask = torch.zeros_like(label)
    mask[..., ::step] = 1
    return mask


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("all_ones", [True, False])
def test_equals_monai_dice_ce_without_mask(batch, include_background, all_ones):
    logits, label = _data(batch)
    mask = torch.ones_like(label) if all_ones else None
    expected = DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background)(
        logits, label
    )
    got = masked_dice_ce(logits, label, mask, include_background=include_background)
    assert torch.allclose(got, expected, rtol=1e-6, atol=ATOL), (got, expected)


def test_equals_monai_dice_ce_with_lambdas_and_smoothing():
    logits, label = _data()
    kwargs = {"smooth_nr": 0.0, "smooth_dr": 1e-3, "lambda_dice": 0.3, "lambda_ce": 2.0}
    expected = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)(logits, label)
    assert torch.allclose(masked_dice_ce(logits, label, **kwargs), expected, rtol=1e-6, atol=ATOL)


def test_masked_voxels_get_zero_gradient():
    logits, label = _data()
    mask = _slice_mask(label)
    logits.requires_grad_(True)
    masked_dice_ce(logits, label, mask).backward()
    outside = (mask == 0).expand_as(logits)
    assert torch.count_nonzero(logits.grad[outside]) == 0
    assert torch.count_nonzero(logits.grad[~outside]) > 0


def test_masked_voxels_do_not_change_the_loss():
    logits, label = _data()
    mask = _slice_mask(label)
    reference = masked_dice_ce(logits, label, mask)
    outside = mask == 0
    other_logits = torch.where(outside.expand_as(logits), 100 * torch.randn_like(logits), logits)
    other_label = torch.where(outside, (label + 3) % C, label)
    assert torch.equal(masked_dice_ce(other_logits, other_label, mask), reference)
    # an out-of-range "unknown" label in masked voxels is ignored too
    unknown = torch.where(outside, torch.full_like(label, -1), label)
    assert torch.equal(masked_dice_ce(logits, unknown, mask), reference)


def test_masked_loss_equals_loss_on_the_annotated_voxels_alone():
    """Masking slices = DiceCE on the tensor made of the annotated slices only."""
    logits, label = _data()
    mask = _slice_mask(label)
    keep = mask[0, 0, 0, 0].bool()
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits[..., keep], label[..., keep])
    got = masked_dice_ce(logits, label, mask)
    assert torch.allclose(got, expected, rtol=1e-5, atol=ATOL)


def test_monai_onehot_masking_would_count_masked_voxels_as_background():
    """Why neonb one-hots the label itself before MONAI's MaskedDiceLoss."""
    from monai.losses import MaskedDiceLoss

    logits, label = _data()
    mask = _slice_mask(label)
    naive = MaskedDiceLoss(to_onehot_y=True, softmax=True)(logits, label, mask)
    ours = masked_dice_ce(logits, label, mask, lambda_ce=0.0)
    assert not torch.allclose(naive, ours)


def test_sample_without_annotation_is_left_out():
    logits, label = _data(batch=2)
    mask = _slice_mask(label)
    mask[1] = 0
    got = masked_dice_ce(logits, label, mask)
    alone = masked_dice_ce(logits[:1], label[:1], mask[:1])
    assert torch.allclose(got, alone, rtol=1e-6, atol=ATOL)


def test_empty_mask_gives_zero_loss_and_gradient_not_nan():
    logits, label = _data()
    logits.requires_grad_(True)
    loss = masked_dice_ce(logits, label, torch.zeros_like(label))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0
    assert not torch.isnan(logits.grad).any()


def test_perfect_prediction_has_small_loss():
    _, label = _data()
    logits = 50 * torch.nn.functional.one_hot(label[:, 0].long(), C).movedim(-1, 1).float()
    assert masked_dice_ce(logits, label).item() < 1e-4


def test_metatensor_inputs_give_plain_tensor():
    from monai.data import MetaTensor

    logits, label = _data()
    loss = masked_dice_ce(MetaTensor(logits), MetaTensor(label), MetaTensor(torch.ones_like(label)))
    assert type(loss) is torch.Tensor


@pytest.mark.parametrize(
    ("label_shape", "mask_shape", "match"),
    [((2, 1, 6, 5), None, "label must have shape"), ((2, 1, 6, 5, 4), (2, 1, 6, 5, 3), "mask")],
)
def test_shape_mismatch_raises(label_shape, mask_shape, match):
    logits, _ = _data()
    label = torch.zeros(label_shape)
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=match):
        masked_dice_ce(logits, label, mask)


@pytest.mark.parametrize("name", ["smooth_nr", "lambda_dice", "lambda_ce"])
def test_negative_parameters_raise(name):
    with pytest.raises(ConfigError, match=name):
        MaskedDiceCELoss(**{name: -1.0})


@pytest.mark.parametrize(
    ("n_heads", "expected"),
    [
        (1, [1.0]),
        (2, [2 / 3, 1 / 3]),
        (3, [4 / 7, 2 / 7, 1 / 7]),
        (4, [8 / 15, 4 / 15, 2 / 15, 1 / 15]),
    ],
)
def test_deep_supervision_weights(n_heads, expected):
    weights = deep_supervision_weights(n_heads)
    assert weights == pytest.approx(expected)
    assert math.isclose(sum(weights), 1.0)


@pytest.mark.parametrize("n_heads", [0, -1, 2.0, True])
def test_deep_supervision_weights_reject_bad_counts(n_heads):
    with pytest.raises(ConfigError, match="n_heads"):
        deep_supervision_weights(n_heads)


def test_segmentation_loss_is_weighted_sum_over_heads():
    logits, label = _data()
    heads = torch.stack([logits, logits.flip(-1), 2 * logits], dim=1)  # (B, 3, C, X, Y, Z)
    mask = _slice_mask(label)
    batch = {"label": label, "annotation": mask}
    got = SegmentationLoss()(heads, batch)
    w = deep_supervision_weights(3)
    expected = sum(w[h] * masked_dice_ce(heads[:, h], label, mask) for h in range(3))
    assert torch.allclose(got, expected, rtol=1e-6, atol=ATOL)


def test_segmentation_loss_matches_monai_deep_supervision_loss_without_mask():
    logits, label = _data()
    heads = torch.stack([logits, logits.roll(1, dims=2)], dim=1)
    weights = deep_supervision_weights(2)
    monai_loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weights=weights)
    expected = monai_loss(list(torch.unbind(heads, dim=1)), label)
    got = SegmentationLoss()(heads, {"label": label})
    assert torch.allclose(got, expected, rtol=1e-6, atol=ATOL)


def test_segmentation_loss_single_head_and_custom_weights():
    logits, label = _data()
    batch = {"label": label, "annotation": torch.ones_like(label)}
    assert torch.allclose(SegmentationLoss()(logits, batch), masked_dice_ce(logits, label))
    heads = torch.stack([logits, -logits], dim=1)
    got = SegmentationLoss(weights=[3.0, 1.0])(heads, batch)
    expected = 0.75 * masked_dice_ce(logits, label) + 0.25 * masked_dice_ce(-logits, label)
    assert torch.allclose(got, expected, rtol=1e-6, atol=ATOL)


def test_segmentation_loss_backward_through_dynunet_output():
    from neonb.models import ModelConfig, build_model

    net = build_model(ModelConfig(filters=(4, 8, 16), strides=(1, 2, 2), deep_supr_num=1)).train()
    x = torch.randn(2, 2, 8, 8, 8)
    label = torch.randint(0, C, (2, 1, 8, 8, 8)).float()
    mask = _slice_mask(label, step=4)
    loss = SegmentationLoss()(net(x), {"label": label, "annotation": mask})
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("weights", [[], [1.0, -1.0], [0.0, 0.0]])
def test_segmentation_loss_rejects_bad_weights(weights):
    with pytest.raises(ConfigError, match="weights"):
        SegmentationLoss(weights=weights)


def test_segmentation_loss_rejects_wrong_number_of_heads():
    logits, label = _data()
    with pytest.raises(ConfigError, match="3 heads"):
        SegmentationLoss(weights=[1.0, 0.5])(torch.stack([logits] * 3, 1), {"label": label})


def test_segmentation_loss_rejects_bad_output_rank():
    _, label = _data()
    with pytest.raises(ValueError, match="outputs must be"):
        SegmentationLoss()(torch.zeros(2, 10, 6, 5), {"label": label})


# ------------------------------------------------------------ fused heads (the fast path)


def _heads_and_masks(seed=0):
    logits, label = _data(seed=seed)
    heads = torch.stack([logits, logits.flip(-1) * 0.5, 2 * logits.roll(1, dims=2)], dim=1)
    one_sample = torch.zeros_like(label)
    one_sample[1] = _slice_mask(label[1:])  # sample 0 has no annotated voxel
    masks = {
        "none": None,
        "slices": _slice_mask(label),
        "one_sample_empty": one_sample,
        "all_empty": torch.zeros_like(label),
    }
    return heads, label, masks


@pytest.mark.parametrize("mask_name", ["none", "slices", "one_sample_empty", "all_empty"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"include_background": False},
        {"smooth_nr": 0.0, "smooth_dr": 1e-3, "lambda_dice": 0.3, "lambda_ce": 2.0},
    ],
)
def test_fused_heads_equal_per_head_loss_values_and_gradients(mask_name, kwargs):
    heads, label, masks = _heads_and_masks()
    mask = masks[mask_name]
    fused_in = heads.clone().requires_grad_(True)
    ref_in = heads.clone().requires_grad_(True)
    got = masked_dice_ce_heads(fused_in, label, mask, **kwargs)
    expected = torch.stack(
        [masked_dice_ce(ref_in[:, h], label, mask, **kwargs) for h in range(heads.shape[1])]
    )
    assert got.shape == (3,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=ATOL), (got, expected)
    weights = torch.tensor([0.5, 0.3, 0.2])
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(fused_in.grad, ref_in.grad, rtol=1e-4, atol=1e-7)


def test_fused_heads_ignore_out_of_range_labels_under_the_mask():
    heads, label, masks = _heads_and_masks()
    mask = masks["slices"]
    wild = torch.where(mask > 0, label, torch.full_like(label, 99.0))
    assert torch.allclose(
        masked_dice_ce_heads(heads, wild, mask), masked_dice_ce_heads(heads, label, mask)
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_segmentation_loss_fused_equals_per_head(channels_last):
    heads, label, masks = _heads_and_masks(seed=3)
    if channels_last:  # a channels-last network's stacked heads have unusual strides
        heads = torch.stack(
            [h.contiguous(memory_format=torch.channels_last_3d) for h in heads.unbind(1)], dim=1
        )
    batch = {"label": label.long(), "annotation": masks["slices"]}
    for outputs in (heads, heads[:, 0]):  # stacked heads, and a single head
        fused = SegmentationLoss(fused=True)(outputs, batch)
        per_head = SegmentationLoss(fused=False)(outputs, batch)
        assert torch.allclose(fused, per_head, rtol=1e-5, atol=ATOL), (fused, per_head)


def test_fused_heads_reject_a_single_head_tensor():
    logits, label = _data()
    with pytest.raises(ValueError, match="label must have shape"):
        masked_dice_ce_heads(logits, label)


def _coarse_heads(scales, shape=(8, 4, 8), seed=5):
    """Heads at their own resolution (head ``h`` at ``1/scales[h]`` of ``shape``), the same
    heads upsampled by nearest neighbour (``F.interpolate``'s default) and stacked, as DynUNet
    makes them, and a label."""
    g = torch.Generator().manual_seed(seed)
    coarse = []
    for scale in scales:
        size = [n // f for n, f in zip(shape, scale, strict=True)]
        coarse.append(torch.randn(2, C, *size, generator=g) * 2)
    stacked = torch.stack([torch.nn.functional.interpolate(h, size=shape) for h in coarse], dim=1)
    label = torch.randint(0, C, (2, 1, *shape), generator=g).float()
    return coarse, stacked, label


@pytest.mark.parametrize("mask_name", ["none", "slices", "one_sample_empty"])
@pytest.mark.parametrize("kwargs", [{}, {"include_background": False, "lambda_ce": 0.5}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_heads_at_own_resolution_equal_upsampled_heads_values_and_gradients(
    mask_name, kwargs, channels_last
):
    scales = [(1, 1, 1), (2, 2, 2), (4, 1, 2)]  # anisotropic too
    coarse, stacked, label = _coarse_heads(scales)
    masks = {"none": None, "slices": _slice_mask(label), "one_sample_empty": _slice_mask(label)}
    masks["one_sample_empty"][0] = 0
    mask = masks[mask_name]
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    low_in = [h.double().contiguous(memory_format=layout).requires_grad_(True) for h in coarse]
    full_in = stacked.clone().double().requires_grad_(True)
    got = masked_dice_ce_heads(low_in, label, mask, **kwargs)
    expected = masked_dice_ce_heads(full_in, label, mask, **kwargs)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), (got, expected)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    # the gradient reaching each low-resolution head: the upsampling's backward sums blocks
    for h, scale in enumerate(scales):
        summed = torch.nn.functional.avg_pool3d(full_in.grad[:, h], scale) * math.prod(scale)
        assert torch.allclose(low_in[h].grad, summed, rtol=1e-9, atol=1e-14), h


def test_heads_at_own_resolution_differ_from_heads_not_upsampled_by_nearest_neighbour():
    coarse, stacked, label = _coarse_heads([(1, 1, 1), (2, 2, 2)])
    smooth = stacked.clone()
    smooth[:, 1] = torch.nn.functional.interpolate(
        coarse[1], size=stacked.shape[3:], mode="trilinear"
    )
    low = masked_dice_ce_heads(coarse, label)
    full = masked_dice_ce_heads(smooth, label)
    assert torch.allclose(low[0], full[0])
    assert not torch.allclose(low[1], full[1])


def test_segmentation_loss_of_heads_at_own_resolution_equals_stacked_heads():
    coarse, stacked, label = _coarse_heads([(1, 1, 1), (2, 2, 2), (4, 4, 4)])
    batch = {"label": label, "annotation": _slice_mask(label)}
    loss_fn = SegmentationLoss()
    for outputs in (coarse, tuple(coarse)):
        assert torch.allclose(loss_fn(outputs, batch), loss_fn(stacked, batch), rtol=1e-5)
    with pytest.raises(ValueError, match="fused"):
        SegmentationLoss(fused=False)(coarse, batch)


def test_heads_at_own_resolution_are_checked():
    coarse, _, label = _coarse_heads([(1, 1, 1), (2, 2, 2)])
    with pytest.raises(ValueError, match="does not divide"):
        masked_dice_ce_heads([coarse[0], coarse[1][..., :3]], label)
    with pytest.raises(ValueError, match="does not divide"):
        masked_dice_ce_heads([coarse[0], coarse[1][:, :, 0]], label)  # a spatial axis short
    with pytest.raises(ValueError, match="no head"):
        masked_dice_ce_heads([], label)
    with pytest.raises(ValueError, match="class counts differ"):
        masked_dice_ce_heads([coarse[0], coarse[1][:, :5]], label)  # 5 classes, not 10
    with pytest.raises(ValueError, match="class counts differ"):
        masked_dice_ce_heads([coarse[0], coarse[1][:1]], label)  # one sample, not two
