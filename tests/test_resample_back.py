"""Probabilities back to the input grid: the per-axis path against grid_sample's."""

import numpy as np
import torch
from scipy import ndimage

from neonb.segmentation import _sample_back, _sampling_grid


def _smooth_probs(shape, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.normal(size=(classes, *shape)), sigma=(0, 2, 2, 2)) * 20
    return torch.softmax(torch.from_numpy(logits).float(), dim=0)


def _grid_sample(source, voxel_to_source, slab):
    grid = _sampling_grid(voxel_to_source, slab, source.shape[1:])
    return torch.nn.functional.grid_sample(
        source[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]


def test_per_axis_interpolation_equals_grid_sample_for_parallel_axes():
    source = _smooth_probs((14, 17, 11))
    # 1.5 mm model voxels, 0.5 mm input voxels, offsets that reach beyond the source on
    # every side (zeros there), and one flipped axis
    voxel_to_source = np.diag([1 / 3, -1 / 3, 0.4, 1.0])
    voxel_to_source[:3, 3] = [-0.7, 17.2, -0.45]
    slab = [(2, 40), (0, 55), (0, 31)]
    fast = _sample_back(source, voxel_to_source, slab)
    reference = _grid_sample(source, voxel_to_source, slab)
    assert fast.shape == reference.shape == (5, 38, 55, 31)
    assert torch.allclose(fast, reference, atol=2e-6)
    assert (reference == 0).any(), "some output voxels lie beyond the source"
    assert torch.equal(fast.argmax(0)[reference.max(0).values > 0.01],
                       reference.argmax(0)[reference.max(0).values > 0.01])  # fmt: skip


def test_rotated_grids_take_grid_sample():
    source = _smooth_probs((10, 10, 10), seed=1)
    angle = 0.3
    voxel_to_source = np.eye(4)
    voxel_to_source[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    voxel_to_source[:3, 3] = [2.0, -1.0, 0.5]
    slab = [(0, 12), (0, 12), (0, 9)]
    assert torch.equal(
        _sample_back(source, voxel_to_source, slab), _grid_sample(source, voxel_to_source, slab)
    )
