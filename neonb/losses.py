"""Segmentation losses: Dice + cross-entropy, masked to annotated voxels, with deep supervision.

Richter & Fetit (2022) train with the sum of a soft Dice loss and cross-entropy (§3.2.3, Eq. 1-2:
softmax over the classes, one-hot target, Dice averaged over classes), summed over the
deep-supervision heads with weights that shrink with depth (Eq. 3). For label budgeting (§3.4.1)
the same loss is computed "based on the parts of the image that were labeled": voxels outside the
annotation mask are ignored.

* :class:`MaskedDiceCELoss` / :func:`masked_dice_ce`: Dice + CE over the voxels where the mask is
  1. With no mask, or a mask of ones, it equals ``monai.losses.DiceCELoss(to_onehot_y=True,
  softmax=True)`` (the test suite checks this).
* :class:`SegmentationLoss`: the weighted sum over the heads of a DynUNet training output, reading
  ``label`` and ``annotation`` from the batch dict.
* :func:`deep_supervision_weights`: ``1, 1/2, 1/4, ...`` normalised to sum 1.

What is reused from MONAI: the Dice term is ``monai.losses.MaskedDiceLoss``, which applies the
softmax *before* masking and multiplies both prediction and target by the mask, so a masked voxel
adds nothing to the intersection or to either sum of the denominator and gets zero gradient. It is
fed a one-hot target built here: with ``to_onehot_y=True`` it would one-hot the *masked* label,
turning every masked voxel into a class-0 target voxel and inflating the background denominator.
The cross-entropy is torch's per-voxel ``cross_entropy`` averaged over the annotated voxels.
``monai.losses.DeepSupervisionLoss`` is not used: its loss takes only ``(input, target)`` (the mask
would have to be packed into the target), its ``"exp"`` weights are not normalised and are floored
at 1/16, and its target downsampling never applies to DynUNet, whose heads come back at full size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

from neonb.errors import ConfigError

__all__ = [
    "MaskedDiceCELoss",
    "SegmentationLoss",
    "deep_supervision_weights",
    "masked_dice_ce",
    "masked_dice_ce_heads",
]

MASK_THRESHOLD = 0.5
"""Voxels whose mask value exceeds this count as annotated (masks hold 0 and 1)."""


class MaskedDiceCELoss(_Loss):
    """Soft Dice + cross-entropy over the annotated voxels only.

    For logits ``u`` (softmax over classes), one-hot target ``v`` and mask ``m`` (1 = annotated):

    * Dice, per sample ``b`` and class ``k``: ``1 - (2 Σ m·u·v + s_nr) / (Σ m·u + Σ m·v + s_dr)``
      (``monai.losses.MaskedDiceLoss``), averaged over classes and over the samples that have at
      least one annotated voxel;
    * cross-entropy: ``Σ m · CE(u, v) / Σ m``, pooled over all annotated voxels of the batch.

    The total is ``lambda_dice * Dice + lambda_ce * CE``. A masked voxel contributes nothing to
    either term, whatever its logits or label (it may even hold an out-of-range label), and its
    logits get exactly zero gradient.

    Empty masks: a sample with no annotated voxel (a random patch that missed all annotated slices)
    is left out of the Dice average instead of diluting it; if no sample of the batch has an
    annotated voxel, both terms are 0 (still attached to the graph, so ``backward()`` works and
    gives zero gradients) and never NaN.

    With ``mask=None`` or a mask of ones this equals ``monai.losses.DiceCELoss(to_onehot_y=True,
    softmax=True, include_background=..., smooth_nr=..., smooth_dr=..., lambda_dice=...,
    lambda_ce=...)`` up to float rounding.

    Args:
        include_background: if ``False``, class 0 is left out of the Dice term (as in MONAI, the
            cross-entropy always uses all classes).
        smooth_nr: constant added to the Dice numerator.
        smooth_dr: constant added to the Dice denominator.
        lambda_dice: weight of the Dice term, at least 0.
        lambda_ce: weight of the cross-entropy term, at least 0.

    Raises:
        ConfigError: for a negative weight or smoothing constant.
    """

    def __init__(
        self,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("smooth_nr", smooth_nr),
            ("smooth_dr", smooth_dr),
            ("lambda_dice", lambda_dice),
            ("lambda_ce", lambda_ce),
        ):
            if not value >= 0.0:
                raise ConfigError(f"{name} must be at least 0, but found {value!r}")
        self.include_background = include_background
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.dice = MaskedDiceLoss(
            include_background=include_background,
            to_onehot_y=False,
            softmax=True,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            reduction="none",
        )

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            input: logits, ``(B, C, X, Y, Z)`` (any number of spatial dims), ``C >= 2``.
            target: class indices, ``(B, 1, X, Y, Z)``, integer-valued (float or int dtype).
            mask: ``(B, 1, X, Y, Z)`` of 0 and 1 (1 = annotated), or ``None`` for all annotated.

        Returns:
            The loss, a scalar tensor.

        Raises:
            ValueError: when the shapes don't fit together.
        """
        logits, target = _plain(input), _plain(target)
        _check_shapes(logits, target, mask)
        annotated = (
            torch.ones_like(target, dtype=torch.bool)
            if mask is None
            else _plain(mask).to(target.device) > MASK_THRESHOLD
        )
        weight = annotated.to(logits.dtype)
        index = torch.where(annotated, target, torch.zeros_like(target)).long()

        dice_terms = self.dice(logits, one_hot(index, logits.shape[1], dtype=logits.dtype), weight)
        has_voxels = annotated.flatten(1).any(dim=1)
        if bool(has_voxels.all()):
            dice = dice_terms.mean()
        elif bool(has_voxels.any()):
            dice = dice_terms[has_voxels].mean()
        else:
            dice = dice_terms.sum() * 0.0

        voxel_ce = F.cross_entropy(logits, index[:, 0], reduction="none")
        voxel_ce = torch.where(annotated[:, 0], voxel_ce, torch.zeros_like(voxel_ce))
        ce = voxel_ce.sum() / weight.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_ce * ce


def masked_dice_ce(
    logits: Tensor,
    label: Tensor,
    mask: Tensor | None = None,
    *,
    include_background: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> Tensor:
    """Dice + cross-entropy over the voxels where ``mask`` is 1 (see :class:`MaskedDiceCELoss`).

    Args:
        logits: ``(B, C, X, Y, Z)`` network output before softmax.
        label: ``(B, 1, X, Y, Z)`` class indices 0 to ``C - 1``.
        mask: ``(B, 1, X, Y, Z)`` annotation mask of 0 and 1, or ``None`` (all voxels annotated).
        include_background: keep class 0 in the Dice term.
        smooth_nr: constant added to the Dice numerator.
        smooth_dr: constant added to the Dice denominator.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.

    Returns:
        The loss, a scalar tensor.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 10, 4, 4, 4)
        >>> label = torch.zeros(1, 1, 4, 4, 4)
        >>> round(float(masked_dice_ce(logits, label, torch.zeros_like(label))), 6)
        0.0
    """
    loss = MaskedDiceCELoss(
        include_background=include_background,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
    )
    return loss(logits, label, mask)


def masked_dice_ce_heads(
    heads: Tensor | Sequence[Tensor],
    label: Tensor,
    mask: Tensor | None = None,
    *,
    include_background: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> Tensor:
    """:class:`MaskedDiceCELoss` of every deep-supervision head at once, ``(H,)``.

    The same values as ``MaskedDiceCELoss(...)(head, label, mask)`` for each head at the label's
    resolution (up to float rounding; the test suite checks values and gradients), computed
    with less work on the CPU: the mask, the masked one-hot target and its per-class sums are
    built once for all heads, and one ``log_softmax`` per head gives both the cross-entropy and
    (through ``exp``) the softmax of the Dice term. The classes are the last axis of every
    product and sum, so the heads of a channels-last network (``torch.channels_last_3d``) are
    read in place, without a copy into another layout.

    **Heads at their own resolution.** MONAI's DynUNet upsamples a lower head to the label's
    size by nearest-neighbour interpolation before stacking. A head given at its own,
    coarser, resolution is scored as that upsampled head: over each block of ``s`` voxels
    (``s`` the ratio of the label's size to the head's, per axis) the upsampled head is one
    value of the low-resolution head, so every sum of the loss over the block's voxels is that
    value times a sum over the block of the label's: the masked one-hot target pooled over
    blocks (each class's annotated voxels) and the mask pooled likewise. The same Dice and
    cross-entropy, and the same gradient, up to float rounding, from ``1/prod(s)`` of the
    voxels and without the upsampled copies (:class:`neonb.models.HeadsAtOwnResolution`).
    It equals DynUNet's loss only because DynUNet upsamples by nearest neighbour and by whole
    factors; it is not nnU-Net's loss, which compares a low-resolution head with a
    *downsampled label*.

    Args:
        heads: DynUNet's stacked training output, logits ``(B, H, C, X, Y, Z)`` at the label's
            resolution (any number of spatial dims), or a sequence of ``H`` heads
            ``(B, C, x, y, z)``, final head first, each of a size that divides the label's.
            ``C >= 2``.
        label: class indices ``(B, 1, X, Y, Z)``, integer-valued (float or int dtype).
        mask: ``(B, 1, X, Y, Z)`` of 0 and 1 (1 = annotated), or ``None`` for all annotated.
        include_background: keep class 0 in the Dice term.
        smooth_nr: constant added to the Dice numerator.
        smooth_dr: constant added to the Dice denominator.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.

    Returns:
        The loss of each head, ``(H,)``.

    Raises:
        ValueError: when the shapes don't fit together: no heads, a head whose batch or class
            count differs from the final head's, or whose size does not divide the label's.
    """
    target = _plain(label)
    if isinstance(heads, Tensor):
        if heads.ndim < 4:
            raise ValueError(
                f"heads must be (B, H, C, X, Y, Z), but found shape {tuple(heads.shape)}"
            )
        head_list = list(torch.unbind(_plain(heads), dim=1))
    else:
        head_list = [_plain(head) for head in heads]
    if not head_list:
        raise ValueError("heads holds no head")
    _check_shapes(head_list[0], target, mask)
    batch, classes = head_list[0].shape[:2]
    spatial = tuple(target.shape[2:])
    scales = [_head_scale(k, head, (batch, classes), spatial) for k, head in enumerate(head_list)]
    annotated = (
        torch.ones_like(target, dtype=torch.bool)
        if mask is None
        else _plain(mask).to(target.device) > MASK_THRESHOLD
    )
    # The masked one-hot target, classes last: (B, X, Y, Z, C); its mask (B, X, Y, Z, 1).
    dtype = head_list[0].dtype
    weight = annotated[:, 0, ..., None].to(dtype)
    index = torch.where(annotated, target, torch.zeros_like(target)).long()[:, 0, ..., None]
    onehot = torch.zeros(*weight.shape[:-1], classes, dtype=dtype, device=weight.device)
    onehot.scatter_(-1, index, weight)
    ground = onehot.reshape(batch, -1, classes).sum(dim=1)  # (B, C)

    pooled: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
    true_pos, predicted, ce_sums = [], [], []
    for head, scale in zip(head_list, scales, strict=True):
        if scale not in pooled:  # the target's counts per block, once per scale
            counts = _block_sums(onehot, scale).reshape(batch, -1, classes)
            pooled[scale] = (counts, _block_sums(weight, scale).reshape(batch, -1, 1))
        counts, voxels = pooled[scale]
        logits = head.movedim(1, -1).reshape(batch, -1, classes)  # a view if channels-last
        log_probs = torch.log_softmax(logits, dim=2)
        probs = log_probs.exp()
        true_pos.append((probs * counts).sum(dim=1))
        if mask is None:
            predicted.append(probs.sum(dim=1) * math.prod(scale))
        else:
            predicted.append((probs * voxels).sum(dim=1))
        ce_sums.append((log_probs * counts).sum())
    true_pos_all = torch.stack(true_pos, dim=1)  # (B, H, C)
    predicted_all = torch.stack(predicted, dim=1)
    ce_all = torch.stack(ce_sums)  # (H,)

    dice_terms = 1.0 - (2.0 * true_pos_all + smooth_nr) / (
        predicted_all + ground[:, None] + smooth_dr
    )
    if not include_background:
        dice_terms = dice_terms[:, :, 1:]
    has_voxels = annotated.flatten(1).any(dim=1)
    if bool(has_voxels.all()):
        dice = dice_terms.mean(dim=(0, 2))
    elif bool(has_voxels.any()):
        dice = dice_terms[has_voxels].mean(dim=(0, 2))
    else:
        dice = dice_terms.sum(dim=(0, 2)) * 0.0

    ce = -ce_all / weight.sum().clamp_min(1.0)
    return lambda_dice * dice + lambda_ce * ce


def _head_scale(
    k: int, head: Tensor, batch_classes: tuple[int, int], spatial: tuple[int, ...]
) -> tuple[int, ...]:
    """How many times coarser head ``k`` is than the label ``spatial``, per axis; its batch and
    class counts must be ``batch_classes``, the final head's."""
    if tuple(head.shape[:2]) != batch_classes:
        raise ValueError(
            f"head {k} has shape {tuple(head.shape)}: its batch and class counts differ from "
            f"the final head's {batch_classes}"
        )
    size = tuple(head.shape[2:])
    if len(size) != len(spatial) or any(s < 1 or n % s for n, s in zip(spatial, size, strict=True)):
        raise ValueError(
            f"head {k} has shape {tuple(head.shape)}: its size {size} does not divide the "
            f"label's size {spatial}"
        )
    return tuple(n // s for n, s in zip(spatial, size, strict=True))


def _block_sums(x: Tensor, scale: tuple[int, ...]) -> Tensor:
    """Sums of ``x`` ``(B, X, Y, Z, K)`` over blocks of ``scale`` voxels: ``(B, X/sx, ..., K)``."""
    if all(f == 1 for f in scale):
        return x
    split = [d for size, f in zip(x.shape[1:-1], scale, strict=True) for d in (size // f, f)]
    blocks = x.reshape(x.shape[0], *split, x.shape[-1])
    return blocks.sum(dim=tuple(range(2, blocks.ndim - 1, 2)))


def deep_supervision_weights(n_heads: int) -> list[float]:
    """Weights of the deep-supervision heads (paper Eq. 3): halving per level, summing to 1.

    The paper asks only for less weight on the lower-resolution heads. Halving per level is
    nnU-Net's rule and the authors' public code's; the normalisation to a sum of 1 is
    nnU-Net's (the authors' code leaves the weights ``1, 1/2, 1/4, ...`` unnormalised).

    Args:
        n_heads: number of heads, the final one included (``1 + deep_supr_num``).

    Returns:
        ``n_heads`` weights, final head first: ``1, 1/2, 1/4, ...`` divided by their sum.

    Example:
        >>> deep_supervision_weights(3)
        [0.5714285714285714, 0.2857142857142857, 0.14285714285714285]
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ConfigError(f"n_heads must be a positive integer, but found {n_heads!r}")
    raw = [0.5**level for level in range(n_heads)]
    return [w / sum(raw) for w in raw]


class SegmentationLoss(nn.Module):
    """Masked Dice + CE summed over the deep-supervision heads (paper Eq. 1-3).

    ``forward(outputs, batch)`` accepts the network output in any of three forms:

    * ``(B, C, X, Y, Z)``: one head (eval mode, or no deep supervision), weight 1;
    * ``(B, H, C, X, Y, Z)``: DynUNet's stacked training output, final head first; head ``h``
      gets weight ``weights[h]``;
    * a tuple or list of ``H`` heads ``(B, C, x, y, z)`` at their own resolution, final head
      first (:class:`neonb.models.HeadsAtOwnResolution`, what :func:`neonb.engine.fit` trains
      a DynUNet with): scored as the stacked output whose heads were upsampled by nearest
      neighbour, with the same loss and gradients up to float rounding
      (:func:`masked_dice_ce_heads`); fused loss only.

    MONAI's DynUNet upsamples its lower-resolution heads to the full patch size before stacking,
    so every head is compared with the full-resolution ``batch["label"]`` and masked with the
    full-resolution ``batch["annotation"]``. The paper's text (following nnU-Net) instead
    compares the low-resolution outputs with downsampled labels; the two differ only in how
    the coarse prediction and the fine label are brought to a common grid. (The authors'
    public code, on MONAI's DynUNet too, compares the upsampled heads as neonb does.)

    Args:
        weights: head weights, final head first, normalised to sum 1; ``None`` for
            :func:`deep_supervision_weights` of the number of heads in each call.
        include_background: keep class 0 in the Dice term.
        smooth_nr: constant added to the Dice numerator.
        smooth_dr: constant added to the Dice denominator.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        fused: compute all heads at once with :func:`masked_dice_ce_heads` (the default, faster);
            ``False`` calls :class:`MaskedDiceCELoss` once per head, MONAI's ``MaskedDiceLoss``
            inside, as neonb did before (the same values up to float rounding; kept as the
            reference for the tests and ``benchmarks/bench_pipeline.py --ab``).

    Raises:
        ConfigError: for negative weights or weights that sum to 0.

    Example:
        >>> import torch
        >>> loss_fn = SegmentationLoss()
        >>> outputs = torch.zeros(2, 3, 10, 8, 8, 8)  # DynUNet training output, 3 heads
        >>> batch = {"label": torch.zeros(2, 1, 8, 8, 8)}
        >>> loss_fn(outputs, batch).shape
        torch.Size([])
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        *,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or min(weights) < 0.0 or sum(weights) <= 0.0:
                raise ConfigError(
                    f"weights must be non-negative with a positive sum, but found {weights!r}"
                )
            weights = [w / sum(weights) for w in weights]
        self.weights: list[float] | None = weights
        self.loss = MaskedDiceCELoss(
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )
        self.fused = bool(fused)
        self.options = {
            "include_background": include_background,
            "smooth_nr": float(smooth_nr),
            "smooth_dr": float(smooth_dr),
            "lambda_dice": float(lambda_dice),
            "lambda_ce": float(lambda_ce),
        }

    def head_weights(self, n_heads: int) -> list[float]:
        """The weights used for ``n_heads`` heads, final head first."""
        if self.weights is None:
            return deep_supervision_weights(n_heads)
        if len(self.weights) != n_heads:
            raise ConfigError(
                f"SegmentationLoss has {len(self.weights)} weights {self.weights} but the network "
                f"output has {n_heads} heads"
            )
        return self.weights

    def forward(self, outputs: Tensor | Sequence[Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """Compute the loss for one batch.

        Args:
            outputs: logits ``(B, C, X, Y, Z)``, stacked heads ``(B, H, C, X, Y, Z)``, or a
                sequence of heads ``(B, C, x, y, z)`` at their own resolution, final first.
            batch: holds ``"label"`` ``(B, 1, X, Y, Z)`` and optionally ``"annotation"``
                ``(B, 1, X, Y, Z)`` (missing: every voxel annotated).

        Returns:
            The weighted loss, a scalar tensor.

        Raises:
            ValueError: for outputs of another shape, or heads at their own resolution
                given to the per-head loss (``fused=False``).
        """
        label = batch["label"]
        mask = batch.get("annotation")
        if isinstance(outputs, Tensor):
            if outputs.ndim not in (label.ndim, label.ndim + 1):
                raise ValueError(
                    f"outputs must be (B, C, X, Y, Z) or (B, H, C, X, Y, Z) for a label of "
                    f"shape {tuple(label.shape)}, but found shape {tuple(outputs.shape)}"
                )
            heads: Tensor | Sequence[Tensor] = (
                outputs if outputs.ndim == label.ndim + 1 else outputs.unsqueeze(1)
            )
        elif not self.fused:
            raise ValueError("heads at their own resolution need the fused loss (fused=True)")
        else:
            heads = outputs
        weights = self.head_weights(heads.shape[1] if isinstance(heads, Tensor) else len(heads))
        if self.fused:
            losses = masked_dice_ce_heads(heads, label, mask, **self.options)
            total = weights[0] * losses[0]
            for h, weight in enumerate(weights[1:], start=1):
                total = total + weight * losses[h]
            return total
        per_head = list(torch.unbind(heads, dim=1))
        total = weights[0] * self.loss(per_head[0], label, mask)
        for weight, head in zip(weights[1:], per_head[1:], strict=True):
            total = total + weight * self.loss(head, label, mask)
        return total


def _plain(x: Tensor) -> Tensor:
    """``x`` as a plain ``torch.Tensor`` (a MONAI ``MetaTensor`` would drag metadata along)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _check_shapes(logits: Tensor, target: Tensor, mask: Tensor | None) -> None:
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must be (B, C, X, Y, Z) with C >= 2 classes, but found {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"label must have shape {expected} for logits {tuple(logits.shape)}, "
            f"but found {tuple(target.shape)}"
        )
    if mask is not None and tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have shape {expected} for logits {tuple(logits.shape)}, "
            f"but found {tuple(mask.shape)}"
        )
