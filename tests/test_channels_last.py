"""Tests of neonb.models.channels_last: the same network, laid out for fast CPU training."""

from __future__ import annotations

import torch

from neonb.models import InstanceNorm3dChannelsLast, ModelConfig, build_model, channels_last

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


def test_channels_last_instance_norm_matches_float64_and_keeps_the_layout():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 6, 5, 4, generator=g) * 3 + 5).contiguous(
        memory_format=torch.channels_last_3d
    )
    grad = torch.randn(2, 3, 6, 5, 4, generator=g).contiguous(memory_format=torch.channels_last_3d)
    norm = InstanceNorm3dChannelsLast(3, affine=True)
    reference = torch.nn.InstanceNorm3d(3, affine=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        reference.load_state_dict(norm.state_dict())
    x32, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y32, y64 = norm(x32), reference(x64)
    assert y32.is_contiguous(memory_format=torch.channels_last_3d)
    assert not reference(x64.detach()).is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y32.double(), y64, atol=1e-5)
    y32.backward(grad)
    y64.backward(grad.double())
    assert x32.grad.is_contiguous(memory_format=torch.channels_last_3d)
    norm.eval()  # eval mode: PyTorch's instance norm, bit for bit
    stock = torch.nn.InstanceNorm3d(3, affine=True)
    stock.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), stock(x))
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-5)
    assert torch.allclose(norm.weight.grad.double(), reference.weight.grad, atol=1e-4)
    assert torch.allclose(norm.bias.grad.double(), reference.bias.grad, atol=1e-4)


def test_channels_last_swaps_the_instance_norms_unless_told_not_to():
    _, model = _pair()
    weights = [id(m.weight) for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    channels_last(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is InstanceNorm3dChannelsLast for m in norms)
    assert [id(m.weight) for m in norms] == weights  # the same parameters
    _, plain = _pair()
    channels_last(plain, instance_norms=False)
    assert all(type(m) is not InstanceNorm3dChannelsLast for m in plain.modules())
