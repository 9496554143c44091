"""Tests of neonb.models.channels_last: the same network, laid out for fast CPU training."""

from __future__ import annotations

import torch

from neonb.models import ModelConfig, build_model, channels_last

CONFIG = ModelConfig(filters=(4, 8, 16), strides=(1, 2, 2), deep_supr_num=1)


def _pair():
    torch.manual_seed(0)
    reference = build_model(CONFIG).train()
    converted = build_model(CONFIG).train()
    converted.load_state_dict(reference.state_dict())
    with torch.no_grad():  # non-trivial affine parameters of the norms
        for a, b in zip(reference.parameters(), converted.parameters(), strict=True):
            if a.ndim == 1:
                a.uniform_(0.5, 1.5)
                b.copy_(a)
    return reference, converted


def test_keeps_parameters_and_keys():
    _, model = _pair()
    before = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert channels_last(model) is model
    assert [id(p) for p in model.parameters()] == before  # an optimiser built before still works
    assert list(model.state_dict()) == keys
    assert all(
        p.is_contiguous(memory_format=torch.channels_last_3d)
        for p in model.parameters()
        if p.ndim == 5
    )


def test_same_outputs_and_gradients_as_the_original():
    reference, converted = _pair()
    channels_last(converted)
    x = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    y_ref = reference(x)
    y = converted(x.contiguous(memory_format=torch.channels_last_3d))
    assert y.shape == y_ref.shape == (2, 2, 10, 16, 16, 16)
    assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for (name, a), b in zip(reference.named_parameters(), converted.parameters(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-6)
        assert (a.grad - b.grad).abs().max() / scale < 1e-3, name
