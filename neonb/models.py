"""The segmentation network: a configured :class:`monai.networks.nets.DynUNet`.

Richter & Fetit (2022, §3.2.4) train a 3D U-Net in the nnU-Net mould: an input block, four
downsampling blocks, a bottleneck, five upsampling blocks and an output block; two
convolutions per resolution step, each followed by instance normalisation and a leaky ReLU;
residual connections inside the blocks; deep supervision. MONAI's ``DynUNet`` is exactly that
network, so this module only holds its settings (:class:`ModelConfig`, which reads and writes
plain dictionaries for YAML/JSON run files) and builds it (:func:`build_model`).

Shapes, for a batch of ``B`` patches of ``X × Y × Z`` voxels with the defaults (the paper's
128³ patches and batch of 2; neonb's two deep-supervision heads):

=============================  ======================================  ========================
mode                           output                                  128³ patches, B = 2
=============================  ======================================  ========================
``train()``, deep supervision  ``(B, 1 + deep_supr_num, C, X, Y, Z)``  ``(2, 3, 10, 128, 128, 128)``
``eval()``                     ``(B, C, X, Y, Z)``                     ``(2, 10, 128, 128, 128)``
=============================  ======================================  ========================

In training mode with deep supervision, index 0 along the second axis is the final head and
index ``k`` the head ``k`` levels further down (``1/2**k`` of the resolution). MONAI upsamples
each lower-resolution head to the full patch size (nearest-neighbour ``interpolate``) before
stacking, so every head is compared with the full-resolution label (see
:class:`neonb.losses.SegmentationLoss`).

Each spatial size must be divisible by the product of the strides (the *total stride*, 32 for
the paper's ``(1, 2, 2, 2, 2, 2)``); the bottleneck then has ``size / total_stride`` voxels per
axis: a 128³ patch gives a 4³ bottleneck, as in the paper. :func:`check_patch_size` tests this
before any layer runs.

The age-prediction head of the AgeU-Net (§3.3) reads the bottleneck, ``model.bottleneck``; it can
be attached with a forward hook or by subclassing ``DynUNet`` with :func:`dynunet_kwargs`.

Example:
    >>> import torch
    >>> from neonb.models import ModelConfig, build_model, check_patch_size
    >>> cfg = ModelConfig(filters=(8, 16, 32, 64, 128, 128))
    >>> check_patch_size(64, cfg)
    (64, 64, 64)
    >>> net = build_model(cfg).eval()
    >>> net(torch.zeros(1, 2, 64, 64, 64)).shape
    torch.Size([1, 10, 64, 64, 64])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import DynUNet
from torch import Tensor, nn

from neonb.errors import ConfigError
from neonb.labels import NUM_CLASSES

__all__ = [
    "INPUT_CHANNELS",
    "ModelConfig",
    "build_model",
    "bottleneck_size",
    "channels_last",
    "check_channels",
    "check_patch_size",
    "dynunet_kwargs",
    "head_scales",
    "HeadsAtOwnResolution",
    "InstanceNorm3dChannelsLast",
    "reference_channel",
    "swap_instance_norms",
    "total_stride",
]

SPATIAL_DIMS = 3
"""The network is 3D."""

PAPER_STRIDES: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
"""Input block, four downsampling blocks and the bottleneck (§3.2.4): total stride 32."""

PAPER_PATCH_SIZE: tuple[int, int, int] = (128, 128, 128)
"""Training patch size of the paper (§3.2.1), in voxels."""

INPUT_CHANNELS: tuple[tuple[str, ...], ...] = (("t1w", "t2w"), ("t2w",), ("t1w",))
"""The input channels a network may take, in the order they are stacked: the paper's T1w and
T2w (§3.2.1), or one of them alone."""

_NORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "instance": ("INSTANCE", {"affine": True}),
    "batch": ("BATCH", {"affine": True}),
}
_ACTS: dict[str, tuple[str, dict[str, Any]]] = {
    "leakyrelu": ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    "relu": ("relu", {"inplace": True}),
    "prelu": ("prelu", {}),
}

Stride = int | tuple[int, int, int]


@dataclass(frozen=True)
class ModelConfig:
    """Settings of the DynUNet segmentation network.

    The defaults are the paper's network (§3.2.4) for the two-channel [T1w, T2w] input and the ten
    drawem9 classes, with the values the paper does not state taken from MONAI (``filters``)
    or chosen by neonb (``deep_supr_num``); :meth:`paper` returns them explicitly.

    Attributes:
        in_channels: number of input channels (2: T1w and T2w).
        out_channels: number of classes (10 for drawem9, background classes included).
        kernel_size: convolution kernel size, one for all blocks or one per block (same length as
            ``strides``); each entry an int or a triple ``(kx, ky, kz)``.
        strides: stride of the input block, of each downsampling block and of the bottleneck;
            each an int or a triple. At least three entries.
        filters: number of feature maps per resolution level, one per entry of ``strides``.
            ``None`` uses MONAI's nnU-Net rule ``min(32 * 2**i, 320)``: ``(32, 64, 128, 256,
            320, 320)`` for six levels. The paper gives no filter counts; the authors' public
            code uses this MONAI default too.
        res_block: residual connections inside the convolution blocks.
        norm: ``"instance"`` (instance norm with affine parameters, MONAI's and nnU-Net's default)
            or ``"batch"``.
        act: ``"leakyrelu"`` (negative slope 0.01), ``"relu"`` or ``"prelu"``.
        deep_supervision: add the deep-supervision heads (training mode only).
        deep_supr_num: number of extra heads, at least 1 and less than ``len(strides) - 1``.
            The default 2 is neonb's choice: the paper gives no number, the authors' public
            code uses 3 (as nnU-Net's rule, every output but the lowest, gives for five
            downsamplings) and MONAI's default is 1.
        dropout: dropout probability in the convolution blocks, or ``None`` for none.

    Raises:
        ConfigError: when a value is out of range; the message quotes it.
    """

    in_channels: int = 2
    out_channels: int = NUM_CLASSES
    kernel_size: Stride | tuple[Stride, ...] = 3
    strides: tuple[Stride, ...] = PAPER_STRIDES
    filters: tuple[int, ...] | None = None
    res_block: bool = True
    norm: str = "instance"
    act: str = "leakyrelu"
    deep_supervision: bool = True
    deep_supr_num: int = 2
    dropout: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "strides", tuple(_as_stride(s, "strides") for s in _as_sequence(self.strides)))
        if isinstance(self.kernel_size, Sequence):
            set_(self, "kernel_size", tuple(_as_stride(k, "kernel_size") for k in self.kernel_size))
        else:
            set_(self, "kernel_size", _as_stride(self.kernel_size, "kernel_size"))
        if self.filters is not None:
            set_(self, "filters", tuple(_as_sequence(self.filters)))
        self._validate()

    def _validate(self) -> None:
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, but found {value!r}")
        n_levels = len(self.strides)
        if n_levels < 3:
            raise ConfigError(
                "strides needs at least three entries (input block, one downsampling block, "
                f"bottleneck), but found {self.strides!r}"
            )
        if isinstance(self.kernel_size, tuple) and len(self.kernel_size) != n_levels:
            raise ConfigError(
                f"kernel_size needs one entry per level ({n_levels}, like strides), "
                f"but found {self.kernel_size!r}"
            )
        if self.filters is not None:
            if len(self.filters) != n_levels:
                raise ConfigError(
                    f"filters needs one entry per level ({n_levels}, like strides), "
                    f"but found {self.filters!r}"
                )
            if not all(_is_int(f) and f >= 1 for f in self.filters):
                raise ConfigError(f"filters must be positive integers, but found {self.filters!r}")
        if self.norm not in _NORMS:
            raise ConfigError(f"norm must be one of {sorted(_NORMS)}, but found {self.norm!r}")
        if self.act not in _ACTS:
            raise ConfigError(f"act must be one of {sorted(_ACTS)}, but found {self.act!r}")
        if self.deep_supervision and not (
            _is_int(self.deep_supr_num) and 1 <= self.deep_supr_num < n_levels - 1
        ):
            raise ConfigError(
                f"deep_supr_num must be an integer from 1 to {n_levels - 2} for {n_levels} levels, "
                f"but found {self.deep_supr_num!r}"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be None or in [0, 1), but found {self.dropout!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> ModelConfig:
        """The network of Richter & Fetit (2022, §3.2.4), optionally with some fields changed.

        From the paper: strides ``(1, 2, 2, 2, 2, 2)`` (five downsamplings, 4³ bottleneck for a
        128³ patch), residual blocks, instance norm, leaky ReLU, deep supervision. Not in the
        paper: kernel 3 (the authors' public code's for isotropic voxels), filters ``(32, 64,
        128, 256, 320, 320)`` (MONAI ``DynUNet``'s default, also the authors' code's) and two
        deep-supervision heads (neonb's choice; the authors' code uses three).

        Args:
            overrides: fields to change, e.g. ``filters=(8, 16, 32, 64, 128, 128)``.
        """
        return cls(**overrides)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build a config from a plain mapping (as read from YAML or JSON).

        Lists become tuples; missing fields keep their defaults.

        Raises:
            ConfigError: for an unknown field (the message lists the known ones) or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _to_tuple(v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict of ints, floats, strings, bools, lists and ``None``."""
        return {f.name: _to_list(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def resolved_filters(self) -> tuple[int, ...]:
        """``filters``, or MONAI's default for this many levels when ``filters`` is ``None``."""
        if self.filters is not None:
            return self.filters
        return tuple(min(2 ** (5 + i), 320) for i in range(len(self.strides)))


def dynunet_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`monai.networks.nets.DynUNet` for ``config``.

    Kept apart from :func:`build_model` so that a subclass of ``DynUNet`` (the AgeU-Net) is built
    from the very same settings.
    """
    n_levels = len(config.strides)
    kernels = (
        list(config.kernel_size)
        if isinstance(config.kernel_size, tuple)
        else [config.kernel_size] * n_levels
    )
    return {
        "spatial_dims": SPATIAL_DIMS,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "kernel_size": kernels,
        "strides": list(config.strides),
        "upsample_kernel_size": list(config.strides[1:]),
        "filters": list(config.resolved_filters),
        "dropout": config.dropout,
        "norm_name": _NORMS[config.norm],
        "act_name": _ACTS[config.act],
        "deep_supervision": config.deep_supervision,
        "deep_supr_num": config.deep_supr_num,
        "res_block": config.res_block,
    }


def build_model(config: ModelConfig | None = None) -> DynUNet:
    """Build the segmentation network.

    Args:
        config: network settings; ``None`` for the paper's (:meth:`ModelConfig.paper`).

    Returns:
        A freshly initialised ``DynUNet`` (Kaiming-normal weights). Input ``(B, in_channels, X, Y,
        Z)``; output ``(B, out_channels, X, Y, Z)`` logits in eval mode, and
        ``(B, 1 + deep_supr_num, out_channels, X, Y, Z)`` in training mode with deep supervision
        (final head first, lower heads upsampled to ``(X, Y, Z)``).
    """
    config = ModelConfig() if config is None else config
    return DynUNet(**dynunet_kwargs(config))


class _InstanceNormChannelsLast(torch.autograd.Function):
    """Affine instance norm of a 5-D tensor in any memory layout, output in the same layout.

    Two passes for the variance (mean first, then the mean square of the centred values), as
    PyTorch's instance norm; the backward pass is the closed form of the normalisation's
    gradient. Everything is element-wise or a sum over the spatial axes, so a channels-last
    input stays channels-last, forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        axes = tuple(range(2, x.ndim))
        count = math.prod(x.shape[2:])
        centred = x - x.sum(dim=axes, keepdim=True) / count
        inv_std = ((centred * centred).sum(dim=axes, keepdim=True) / count + eps).rsqrt()
        normalised = centred * inv_std
        shape = (1, -1) + (1,) * len(axes)
        ctx.save_for_backward(normalised, inv_std, weight)
        return normalised * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        normalised, inv_std, weight = ctx.saved_tensors
        axes = tuple(range(2, grad.ndim))
        count = math.prod(grad.shape[2:])
        sum_grad = grad.sum(dim=axes, keepdim=True)
        sum_grad_norm = (grad * normalised).sum(dim=axes, keepdim=True)
        scale = weight.view((1, -1) + (1,) * len(axes)) * inv_std
        grad_x = (grad - sum_grad / count - normalised * (sum_grad_norm / count)) * scale
        return grad_x, sum_grad_norm.sum(dim=0).flatten(), sum_grad.sum(dim=0).flatten(), None


class InstanceNorm3dChannelsLast(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (affine, no running statistics) that keeps the memory layout.

    PyTorch's instance norm makes its input contiguous and hands back the default layout, so
    in a channels-last network every norm costs a conversion to and from channels-last, and
    so does its gradient. This one computes the same function with element-wise operations
    and sums over the spatial axes, which keep the layout (outputs and gradients agree with
    ``nn.InstanceNorm3d`` to float rounding; the test suite checks them against float64).
    Same parameters and state-dict keys as the module it replaces (:func:`channels_last`).
    Only in training mode: in eval mode (validation, inference), and for inputs that are not
    5-D or not of the parameters' dtype (autocast), it is ``nn.InstanceNorm3d``, so a
    trained model predicts exactly as the same weights loaded into a fresh network.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` ``(B, C, X, Y, Z)`` per sample and channel."""
        if (
            not self.training  # eval: PyTorch's, bit for bit as a freshly loaded model
            or input.ndim != 5
            or self.track_running_stats
            or not self.affine
            or input.dtype != self.weight.dtype  # e.g. under autocast: PyTorch's rules
        ):
            return super().forward(input)
        return _InstanceNormChannelsLast.apply(input, self.weight, self.bias, self.eps)


def swap_instance_norms(model: nn.Module) -> nn.Module:
    """Replace ``model``'s affine ``nn.InstanceNorm3d`` layers by
    :class:`InstanceNorm3dChannelsLast`, in place, sharing their parameters.

    Returns:
        ``model``.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.InstanceNorm3d and child.affine and not child.track_running_stats:
                norm = InstanceNorm3dChannelsLast(child.num_features, eps=child.eps, affine=True)
                norm.weight, norm.bias = child.weight, child.bias
                norm.train(child.training)
                setattr(module, name, norm)
    return model


def channels_last(model: nn.Module, instance_norms: bool = True) -> nn.Module:
    """Store ``model``'s 5-D weights channels-last (``torch.channels_last_3d``), in place.

    oneDNN's CPU convolutions work in that layout; with the input converted too (as
    :func:`neonb.engine.fit` does) they skip converting every tensor to and from it. What the
    model computes does not change (outputs and gradients agree to float rounding; the test
    suite checks this), nor do its parameters' identity (an optimiser built before keeps
    training them) or its state dict's keys, so checkpoints load into either layout. On the CPU
    this makes the demo's training step about 1.2 times faster (``benchmarks/README.md``).

    PyTorch's instance norm hands back the default layout, so each norm would cost two
    conversions (forward and backward); with ``instance_norms`` they are replaced by
    :class:`InstanceNorm3dChannelsLast` (:func:`swap_instance_norms`: the same function and
    parameters, keeping the layout), a further 1.1 times or so per demo step. Replacing them
    by the equivalent one-group-per-channel group norms was measured and not kept: the group
    norm's backward pass is slow, and its single-pass variance is ten times further from a
    float64 reference.

    Args:
        model: a network, e.g. from :func:`build_model`.
        instance_norms: also swap the affine instance norms (:func:`swap_instance_norms`).

    Returns:
        ``model``.
    """
    if instance_norms:
        swap_instance_norms(model)
    return model.to(memory_format=torch.channels_last_3d)


def head_scales(model: nn.Module | ModelConfig) -> list[tuple[int, int, int]] | None:
    """How many times coarser each deep-supervision head is than the final one, per axis.

    In training mode a DynUNet upsamples its lower heads to the patch size by
    nearest-neighbour interpolation before stacking them; head ``k`` (final head first) comes
    from the decoder level ``k`` steps down, coarser by the product of ``strides[1:k + 1]``.
    :class:`HeadsAtOwnResolution` returns the heads at these scales, unupsampled, and
    :class:`neonb.losses.SegmentationLoss` scores them with the same loss as the upsampled heads
    up to float rounding (``benchmarks/README.md``).

    Args:
        model: a MONAI ``DynUNet`` (an AgeU-Net included) or its :class:`ModelConfig`.

    Returns:
        One ``(sx, sy, sz)`` per head, ``(1, 1, 1)`` first; ``None`` when the network has no
        deep supervision, is not a DynUNet, or a scale is not a power of two (PyTorch's
        nearest-neighbour index ``floor(i * size_in / size_out)`` is exact only for those).

    Example:
        >>> head_scales(ModelConfig(strides=(1, 2, 2, 2, 2), deep_supr_num=2))
        [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    """
    if isinstance(model, ModelConfig):
        strides, supervised, n_extra = model.strides, model.deep_supervision, model.deep_supr_num
    elif isinstance(model, DynUNet):
        strides, supervised, n_extra = model.strides, model.deep_supervision, model.deep_supr_num
    else:
        return None
    if not supervised:
        return None
    per_axis = [_triple(s) for s in strides]
    scales = [(1, 1, 1)]
    for k in range(1, int(n_extra) + 1):
        scales.append(tuple(math.prod(axis) for axis in zip(*per_axis[1 : k + 1], strict=True)))  # type: ignore[arg-type]
    if any(f & (f - 1) for scale in scales for f in scale):
        return None
    return scales  # type: ignore[return-value]


class HeadsAtOwnResolution(nn.Module):
    """A DynUNet that returns its deep-supervision heads at their own resolution in training.

    In training mode MONAI's DynUNet upsamples each lower head to the patch size by nearest
    neighbour and stacks the heads, ``(B, H, C, X, Y, Z)``; the upsampling and stacking, and
    their backward passes, are memory traffic on full-size copies of every head. This wrapper
    runs the same network and returns the heads as they are, a tuple ``(final, head_1, ...)``
    of ``(B, C, X / s, Y / s, Z / s)`` (``s`` from :func:`head_scales`), which
    :class:`neonb.losses.SegmentationLoss` scores as the upsampled heads: the same loss and
    gradients up to float rounding. In eval mode, or without deep supervision, it returns what
    the DynUNet returns. It holds ``model`` and no parameters of its own, so an optimiser of
    ``model``'s parameters, its checkpoints and ``DistributedDataParallel`` around the wrapper
    work as with the bare network (:func:`neonb.engine.fit` wraps it there).

    Args:
        model: a ``DynUNet`` with DynUNet's own ``forward`` (a subclass that overrides it,
            such as the AgeU-Net, computes something else).

    Raises:
        ConfigError: for any other network.
    """

    def __init__(self, model: DynUNet) -> None:
        super().__init__()
        if not self.accepts(model):
            raise ConfigError(
                f"HeadsAtOwnResolution needs a DynUNet with DynUNet's own forward, got "
                f"{type(model).__name__}"
            )
        self.model = model

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """Whether ``model`` is a DynUNet with DynUNet's own ``forward`` (what it can wrap)."""
        return isinstance(model, DynUNet) and type(model).forward is DynUNet.forward

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """The heads of ``x`` ``(B, C_in, X, Y, Z)``, final first, or the DynUNet's output."""
        model = self.model
        if not (model.training and model.deep_supervision):
            return model(x)
        final = model.output_block(model.skip_layers(x))  # fills model.heads, as in DynUNet
        return (final, *model.heads)


def total_stride(config: ModelConfig | None = None) -> tuple[int, int, int]:
    """Product of the strides per axis: each patch dimension must be a multiple of it.

    Example:
        >>> total_stride(ModelConfig())
        (32, 32, 32)
    """
    config = ModelConfig() if config is None else config
    per_axis = [_triple(s) for s in config.strides]
    return tuple(math.prod(axis) for axis in zip(*per_axis, strict=True))  # type: ignore[return-value]


def bottleneck_size(
    patch_size: int | Sequence[int], config: ModelConfig | None = None
) -> tuple[int, int, int]:
    """Spatial size of the bottleneck for a patch of ``patch_size`` voxels.

    Example:
        >>> bottleneck_size(128, ModelConfig())
        (4, 4, 4)
    """
    patch = check_patch_size(patch_size, config)
    return tuple(p // s for p, s in zip(patch, total_stride(config), strict=True))  # type: ignore[return-value]


def check_channels(channels: Any) -> tuple[str, ...]:
    """The input channels as a tuple, when they are one of :data:`INPUT_CHANNELS`.

    Args:
        channels: e.g. ``["t2w"]`` or ``("t1w", "t2w")`` (a list from YAML is fine).

    Returns:
        The channels as a tuple of strings, e.g. ``("t2w",)``.

    Raises:
        ConfigError: quoting the value and the allowed ones.
    """
    value = tuple(channels) if isinstance(channels, list | tuple) else None
    if value not in INPUT_CHANNELS:
        allowed = ", ".join(str(list(choice)) for choice in INPUT_CHANNELS)
        raise ConfigError(f"channels must be one of {allowed}, but found {channels!r}")
    return value


def reference_channel(channels: Sequence[str]) -> str:
    """The input whose voxel grid and header a prediction takes: the T2w when the network
    takes it (as the paper's does), else its first channel.

    Example:
        >>> reference_channel(("t1w", "t2w")), reference_channel(("t1w",))
        ('t2w', 't1w')
    """
    return "t2w" if "t2w" in channels else channels[0]


def check_patch_size(
    patch_size: int | Sequence[int], config: ModelConfig | None = None
) -> tuple[int, int, int]:
    """Check that the network accepts patches of ``patch_size`` voxels.

    Each dimension must be a positive multiple of :func:`total_stride`, and at least one must be
    twice it or more: a 1×1×1 bottleneck cannot be instance-normalised in training.

    Args:
        patch_size: one size for all three axes or ``(X, Y, Z)``, in voxels.
        config: network settings; ``None`` for the paper's.

    Returns:
        The patch size as a triple of ints.

    Raises:
        ConfigError: naming the offending size and the total stride.
    """
    config = ModelConfig() if config is None else config
    patch = _as_patch(patch_size)
    stride = total_stride(config)
    bad = [i for i, (p, s) in enumerate(zip(patch, stride, strict=True)) if p % s]
    if bad:
        raise ConfigError(
            f"patch_size {patch} is not divisible by the network's total stride {stride} on axis "
            f"{bad} (strides {config.strides}); try {_round_up(patch, stride)}"
        )
    if all(p == s for p, s in zip(patch, stride, strict=True)):
        raise ConfigError(
            f"patch_size {patch} would leave a 1×1×1 bottleneck (total stride {stride}); make at "
            f"least one dimension {2 * stride[0]} or more"
        )
    return patch


def _as_patch(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    values = (patch_size,) * SPATIAL_DIMS if _is_int(patch_size) else tuple(patch_size)  # type: ignore[arg-type]
    if len(values) != SPATIAL_DIMS or not all(_is_int(v) and v > 0 for v in values):
        raise ConfigError(
            f"patch_size must be a positive integer or three of them, but found {patch_size!r}"
        )
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _round_up(patch: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-p // s) * s for p, s in zip(patch, stride, strict=True))


def _triple(value: Stride) -> tuple[int, int, int]:
    return (value,) * SPATIAL_DIMS if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _as_stride(value: Any, name: str) -> Stride:
    if _is_int(value) and value >= 1:
        return int(value)
    if (
        isinstance(value, Sequence)
        and len(value) == SPATIAL_DIMS
        and all(_is_int(v) and v >= 1 for v in value)
    ):
        return tuple(int(v) for v in value)  # type: ignore[return-value]
    raise ConfigError(
        f"each entry of {name} must be a positive integer or three of them, but found {value!r}"
    )


def _as_sequence(value: Any) -> Sequence[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"expected a list of values, but found {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_to_tuple(v) for v in value)
    return value


def _to_list(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_to_list(v) for v in value]
    return value
