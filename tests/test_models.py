"""Tests of neonb.models: configuration, shapes of the DynUNet outputs, patch-size checks."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import DynUNet

from neonb.errors import ConfigError
from neonb.models import (
    HeadsAtOwnResolution,
    ModelConfig,
    bottleneck_size,
    build_model,
    check_patch_size,
    dynunet_kwargs,
    head_scales,
    total_stride,
)

TINY = {"filters": (4, 8, 16), "strides": (1, 2, 2), "deep_supr_num": 1}
"""A three-level network (total stride 4) that runs in milliseconds."""

# (config overrides, input shape, training output shape, eval output shape)
SHAPES = [
    (TINY, (1, 2, 16, 16, 16), (1, 2, 10, 16, 16, 16), (1, 10, 16, 16, 16)),
    (TINY, (2, 2, 8, 12, 16), (2, 2, 10, 8, 12, 16), (2, 10, 8, 12, 16)),
    (
        {**TINY, "out_channels": 3, "in_channels": 1},
        (2, 1, 8, 8, 4),
        (2, 2, 3, 8, 8, 4),
        (2, 3, 8, 8, 4),
    ),
    (
        {"filters": (4, 4, 8, 8), "strides": (1, 2, 2, 2), "deep_supr_num": 2},
        (1, 2, 16, 16, 8),
        (1, 3, 10, 16, 16, 8),
        (1, 10, 16, 16, 8),
    ),
    (
        {**TINY, "deep_supervision": False},
        (1, 2, 8, 8, 8),
        (1, 10, 8, 8, 8),
        (1, 10, 8, 8, 8),
    ),
    (
        {"filters": (4, 8, 16), "strides": (1, (2, 2, 1), 2), "deep_supr_num": 1},
        (1, 2, 8, 8, 4),
        (1, 2, 10, 8, 8, 4),
        (1, 10, 8, 8, 4),
    ),
]


@pytest.mark.parametrize(("overrides", "input_shape", "train_shape", "eval_shape"), SHAPES)
def test_output_shapes(overrides, input_shape, train_shape, eval_shape):
    config = ModelConfig(**overrides)
    net = build_model(config)
    x = torch.randn(input_shape)
    net.train()
    assert net(x).shape == train_shape
    net.eval()
    with torch.no_grad():
        assert net(x).shape == eval_shape


def test_deep_supervision_heads_are_upsampled_lower_resolution_outputs():
    net = build_model(ModelConfig(**TINY)).train()
    out = net(torch.randn(1, 2, 16, 16, 16))
    head = out[:, 1]
    # head 1 comes from half resolution, upsampled by nearest neighbour: constant 2x2x2 blocks
    assert torch.equal(head[..., ::2, ::2, ::2], head[..., 1::2, 1::2, 1::2])
    assert not torch.equal(out[:, 0, ..., ::2, ::2, ::2], out[:, 0, ..., 1::2, 1::2, 1::2])


def test_defaults_are_the_paper_network():
    config = ModelConfig.paper()
    assert config == ModelConfig()
    assert config.strides == (1, 2, 2, 2, 2, 2)
    assert config.resolved_filters == (32, 64, 128, 256, 320, 320)
    assert total_stride(config) == (32, 32, 32)
    assert bottleneck_size(128, config) == (4, 4, 4)
    kwargs = dynunet_kwargs(config)
    assert kwargs["upsample_kernel_size"] == [2, 2, 2, 2, 2]
    assert kwargs["norm_name"] == ("INSTANCE", {"affine": True})
    assert kwargs["res_block"] and kwargs["deep_supervision"] and kwargs["deep_supr_num"] == 2


def test_build_model_returns_dynunet_with_paper_layout():
    net = build_model(ModelConfig.paper(filters=(2, 2, 2, 2, 2, 2)))
    assert isinstance(net, DynUNet)
    assert len(net.downsamples) == 4  # plus input block and bottleneck
    assert len(net.upsamples) == 5
    assert len(net.deep_supervision_heads) == 2


def test_bottleneck_output_size():
    config = ModelConfig(**TINY)
    net = build_model(config).eval()
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = output.shape

    net.bottleneck.register_forward_hook(record)
    with torch.no_grad():
        net(torch.randn(1, 2, 16, 8, 12))
    assert seen["shape"][2:] == bottleneck_size((16, 8, 12), config) == (4, 2, 3)


def test_dict_round_trip_is_json_friendly():
    config = ModelConfig(filters=(8, 16, 32, 64, 128, 128), dropout=0.1)
    values = json.loads(json.dumps(config.to_dict()))
    assert values["strides"] == [1, 2, 2, 2, 2, 2]
    assert ModelConfig.from_dict(values) == config
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_anisotropic_strides_round_trip():
    config = ModelConfig(filters=(4, 8, 16), strides=(1, (2, 2, 1), 2), deep_supr_num=1)
    assert total_stride(config) == (4, 4, 2)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("patch", "expected"),
    [(64, (64, 64, 64)), ((128, 64, 96), (128, 64, 96)), ([32, 32, 64], (32, 32, 64))],
)
def test_check_patch_size_accepts(patch, expected):
    assert check_patch_size(patch, ModelConfig()) == expected


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        (48, "not divisible"),
        ((64, 64, 100), r"axis \[2\]"),
        (32, "1×1×1 bottleneck"),
        ((64, 64), "three"),
        (0, "positive"),
        ((64.0, 64, 64), "positive integer"),
        ("64", "positive integer"),
    ],
)
def test_check_patch_size_rejects(patch, match):
    with pytest.raises(ConfigError, match=match):
        check_patch_size(patch, ModelConfig())


def test_check_patch_size_uses_the_config_strides():
    assert check_patch_size(12, ModelConfig(**TINY)) == (12, 12, 12)
    with pytest.raises(ConfigError, match="total stride"):
        check_patch_size(12, ModelConfig())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strides": (1, 2)}, "at least three"),
        ({"strides": (1, 0, 2)}, "positive integer"),
        ({"strides": (1, (2, 2), 2)}, "three of them"),
        ({"filters": (8, 16)}, "one entry per level"),
        ({"filters": (8, 16, 0, 1, 1, 1)}, "positive integers"),
        ({"kernel_size": (3, 3)}, "one entry per level"),
        ({"norm": "group"}, "norm must be one of"),
        ({"act": "swish"}, "act must be one of"),
        ({"deep_supr_num": 5}, "deep_supr_num"),
        ({"deep_supr_num": 0}, "deep_supr_num"),
        ({"dropout": 1.5}, "dropout"),
        ({"out_channels": 0}, "out_channels"),
        ({"in_channels": True}, "in_channels"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**overrides)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown model setting.*'filter'"):
        ModelConfig.from_dict({"filter": [8, 16]})


def test_deep_supr_num_ignored_without_deep_supervision():
    config = ModelConfig(deep_supervision=False, deep_supr_num=99)
    assert not build_model(ModelConfig(**{**TINY, "deep_supervision": False})).deep_supervision
    assert config.deep_supr_num == 99


def test_head_scales_match_the_upsampling_of_the_heads():
    config = ModelConfig(**TINY)
    net = build_model(config).train()
    scales = head_scales(net)
    assert (
        scales
        == head_scales(config)
        == [(1, 1, 1)] + [(2**k,) * 3 for k in range(1, config.deep_supr_num + 1)]
    )
    out = net(torch.randn(1, 2, 16, 16, 16))
    for h, scale in enumerate(scales[1:], start=1):  # constant over blocks of `scale` voxels
        f = scale[0]
        coarse = out[:, h, ..., ::f, ::f, ::f]
        up = coarse.repeat_interleave(f, -1).repeat_interleave(f, -2).repeat_interleave(f, -3)
        assert torch.equal(up, out[:, h])


def test_head_scales_anisotropic_and_none():
    config = ModelConfig(strides=(1, (2, 2, 1), 2, 2), deep_supr_num=2, filters=(4, 8, 16, 32))
    assert head_scales(config) == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    assert head_scales(ModelConfig(**{**TINY, "deep_supervision": False})) is None
    assert head_scales(ModelConfig(strides=(1, 3, 2), filters=(4, 8, 16), deep_supr_num=1)) is None
    assert head_scales(torch.nn.Linear(2, 2)) is None


def test_heads_at_own_resolution_are_the_heads_dynunet_upsamples():
    net = build_model(ModelConfig(**TINY)).train()
    heads = HeadsAtOwnResolution(net)
    x = torch.randn(1, 2, 16, 16, 16)
    stacked = net(x)
    own = heads(x)
    scales = head_scales(net)
    assert isinstance(own, tuple) and len(own) == len(scales) == stacked.shape[1]
    for h, (head, scale) in enumerate(zip(own, scales, strict=True)):
        assert head.shape[2:] == tuple(16 // f for f in scale)
        upsampled = torch.nn.functional.interpolate(head, size=(16, 16, 16))
        assert torch.equal(upsampled, stacked[:, h])
    assert list(heads.parameters()) == list(net.parameters())  # no parameters of its own
    heads.eval()  # eval mode: the DynUNet's own output, the final head
    with torch.no_grad():
        assert torch.equal(heads(x), net(x))


def test_heads_at_own_resolution_refuse_other_networks():
    class OwnForward(DynUNet):
        def forward(self, x):
            return super().forward(x)

    net = build_model(ModelConfig(**TINY))
    net.__class__ = OwnForward
    with pytest.raises(ConfigError, match="DynUNet's own forward"):
        HeadsAtOwnResolution(net)
    with pytest.raises(ConfigError, match="Conv3d"):
        HeadsAtOwnResolution(torch.nn.Conv3d(2, 2, 1))
